//! The Kubernetes key layout, as far as routing needs it.
//!
//! kube-apiserver stores an object at
//! `<base><resource>/[<namespace>/]<name>` (built-in resources) or
//! `<base><group>/<resource>/[<namespace>/]<name>` (custom resources, CRDs,
//! APIServices), where `<base>` is the registry prefix followed by `/`
//! (`/registry/` by default). A first segment containing a `.` is a group
//! (custom resource groups always contain one; built-in resources are stored
//! under their bare, dot-less resource name). Core `services` add one more
//! level, `specs` or `endpoints`, before the namespace.
//!
//! Everything here works on *prefixes* as well as on whole keys: [`Shape`]
//! records only the parts that are complete (followed by a `/`) in the bytes
//! given. For a whole key a missing part means "the key has none"; for a
//! prefix it means "not known yet, keys under this prefix may differ".

use std::ops::Range;

use super::HashBy;

/// Resources that kube-apiserver stores one level deeper: the segment after
/// the resource is one of these sub-types, and the namespace comes after it.
const SUBTYPED: &[(&[u8], &[&[u8]])] = &[(b"services", &[b"specs", b"endpoints"])];

/// API groups of kube-apiserver's built-in resources. Their objects are
/// stored without a group segment (`/registry/deployments/...` for
/// `apps/deployments`), so a route naming one of these groups matches on the
/// resource segment alone. The groups whose objects *are* stored under the
/// group (`apiextensions.k8s.io`, `apiregistration.k8s.io`) are absent here,
/// and are treated like custom resource groups.
pub(crate) const UNGROUPED_BUILTIN_GROUPS: &[&str] = &[
    "",
    "core",
    "admissionregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// `/registry` becomes `/registry/`; `/` stays `/`.
pub(crate) fn registry_base(prefix: &str) -> Vec<u8> {
    let mut base = prefix.trim_end_matches('/').as_bytes().to_vec();
    base.push(b'/');
    base
}

fn subtypes_of(resource: &[u8]) -> Option<&'static [&'static [u8]]> {
    SUBTYPED
        .iter()
        .find(|(name, _)| *name == resource)
        .map(|(_, subtypes)| *subtypes)
}

fn find_slash(bytes: &[u8], from: usize) -> Option<usize> {
    bytes
        .get(from..)?
        .iter()
        .position(|&b| b == b'/')
        .map(|i| from + i)
}

/// What the bytes (a key or a prefix) tell about the Kubernetes structure.
/// Offsets index the bytes given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The bytes diverge from the registry base: neither they nor anything
    /// extending them is a registry key.
    pub outside: bool,
    /// End of `<base>[<group>/]<resource>/`, when complete.
    pub resource_end: Option<usize>,
    /// Where the namespace segment starts (after the resource, and after the
    /// sub-type of `services`), when that is determined.
    pub scope_start: Option<usize>,
    /// The namespace segment, when complete (a `/` follows it).
    pub namespace: Option<Range<usize>>,
}

/// Splits `bytes` along the layout described in the module documentation.
pub(crate) fn shape(base: &[u8], bytes: &[u8]) -> Shape {
    let mut shape = Shape::default();
    let Some(rest) = bytes.strip_prefix(base) else {
        shape.outside = !base.starts_with(bytes);
        return shape;
    };
    let n = base.len();
    let Some(first_end) = find_slash(rest, 0) else {
        return shape;
    };
    let first = &rest[..first_end];
    let mut pos = first_end + 1;
    let grouped = first.contains(&b'.');
    if grouped {
        let Some(resource_end) = find_slash(rest, pos) else {
            return shape;
        };
        pos = resource_end + 1;
    }
    shape.resource_end = Some(n + pos);
    if !grouped && let Some(subtypes) = subtypes_of(first) {
        let Some(end) = find_slash(rest, pos) else {
            return shape;
        };
        if subtypes.contains(&&rest[pos..end]) {
            pos = end + 1;
        }
    }
    shape.scope_start = Some(n + pos);
    if let Some(end) = find_slash(rest, pos) {
        shape.namespace = Some(n + pos..n + end);
    }
    shape
}

/// The bytes a hashed route places `key` by (see the topology documentation):
/// `<base>[<group>/]<resource>/` for [`HashBy::Resource`], that plus
/// `[<sub-type>/]<namespace>/` for [`HashBy::ResourceNamespace`] when the key
/// has a namespace segment, and the empty string for keys without a resource
/// segment.
pub(crate) fn placement_key<'k>(base: &[u8], key: &'k [u8], hash: HashBy) -> &'k [u8] {
    let shape = shape(base, key);
    let resource = shape.resource_end.map(|end| &key[..end]);
    let end = match hash {
        HashBy::Resource => resource,
        HashBy::ResourceNamespace => shape.namespace.map(|ns| &key[..ns.end + 1]).or(resource),
    };
    end.unwrap_or_default()
}

/// The placement key shared by every key that starts with `prefix`, if they
/// all share one (else keys under the prefix may land on any shard of the
/// route).
pub(crate) fn fixed_placement<'p>(base: &[u8], prefix: &'p [u8], hash: HashBy) -> Option<&'p [u8]> {
    let shape = shape(base, prefix);
    if shape.outside {
        return Some(b"");
    }
    match hash {
        HashBy::Resource => shape.resource_end.map(|end| &prefix[..end]),
        HashBy::ResourceNamespace => shape.namespace.map(|ns| &prefix[..ns.end + 1]),
    }
}

/// How many of the keys under a prefix a matcher matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coverage {
    /// No key that starts with the prefix matches.
    None,
    /// Some may, some may not (or it cannot be told cheaply).
    Some,
    /// Every key that starts with the prefix matches.
    All,
}

/// Coverage of "keys with one of these prefixes" over the keys under `prefix`.
pub(crate) fn prefixes_coverage(prefixes: &[Vec<u8>], prefix: &[u8]) -> Coverage {
    if prefixes.iter().any(|q| prefix.starts_with(q)) {
        Coverage::All
    } else if prefixes.iter().any(|q| q.starts_with(prefix)) {
        Coverage::Some
    } else {
        Coverage::None
    }
}

/// Coverage of "the namespace segment is `namespace`" over the keys under
/// `prefix`.
pub(crate) fn namespace_coverage(base: &[u8], namespace: &[u8], prefix: &[u8]) -> Coverage {
    let shape = shape(base, prefix);
    if shape.outside {
        return Coverage::None;
    }
    if let Some(ns) = shape.namespace {
        return if &prefix[ns] == namespace {
            Coverage::All
        } else {
            Coverage::None
        };
    }
    match shape.scope_start {
        // The structure is fixed and the namespace segment, if keys under
        // the prefix have one, starts with the tail of the prefix.
        Some(start) if !namespace.starts_with(&prefix[start..]) => Coverage::None,
        _ => Coverage::Some,
    }
}

/// Whether `key`'s namespace segment is `namespace`.
pub(crate) fn has_namespace(base: &[u8], namespace: &[u8], key: &[u8]) -> bool {
    shape(base, key)
        .namespace
        .is_some_and(|ns| &key[ns] == namespace)
}

/// The key prefixes a resource matcher stands for (their union is exactly
/// the set of keys the matcher matches, by [`shape`]'s rules).
pub(crate) fn resource_prefixes(
    base: &[u8],
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> Vec<Vec<u8>> {
    let ungrouped = UNGROUPED_BUILTIN_GROUPS.contains(&group);
    let mut resource_prefix = base.to_vec();
    if !ungrouped {
        resource_prefix.extend_from_slice(group.as_bytes());
        resource_prefix.push(b'/');
    }
    resource_prefix.extend_from_slice(resource.as_bytes());
    resource_prefix.push(b'/');
    let Some(namespace) = namespace else {
        return vec![resource_prefix];
    };
    let with = |middle: &[u8]| {
        let mut p = resource_prefix.clone();
        p.extend_from_slice(middle);
        p.extend_from_slice(namespace.as_bytes());
        p.push(b'/');
        p
    };
    let subtypes = if ungrouped {
        subtypes_of(resource.as_bytes())
    } else {
        None
    };
    match subtypes {
        None => vec![with(b"")],
        Some(subtypes) => {
            let mut prefixes: Vec<Vec<u8>> = subtypes
                .iter()
                .map(|subtype| {
                    let mut middle = subtype.to_vec();
                    middle.push(b'/');
                    with(&middle)
                })
                .collect();
            // `services/<ns>/...` with a namespace that is not a sub-type
            // name: the sub-type level is absent.
            if !subtypes.contains(&namespace.as_bytes()) {
                prefixes.push(with(b""));
            }
            prefixes
        }
    }
}

/// The smallest byte string greater than every string that starts with
/// `prefix` (etcd's "prefix end"), or `None` when there is none (the prefix is
/// empty or all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// The longest prefix `p` of `start` such that every key in `[start, end)`
/// starts with `p` (`end = None`: unbounded). It is the longest prefix of
/// `start` whose prefix end is at least `end`; that holds for the empty
/// prefix and stops holding from some length on, so a binary search finds it.
pub(crate) fn covering_prefix<'a>(start: &'a [u8], end: Option<&[u8]>) -> &'a [u8] {
    let covers = |len: usize| match (prefix_end(&start[..len]), end) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(limit), Some(end)) => end <= limit.as_slice(),
    };
    // Invariant: covers(lo), and !covers(hi) unless hi == start.len() + 1.
    let (mut lo, mut hi) = (0, start.len() + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if covers(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    &start[..lo]
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[u8] = b"/registry/";

    fn ns_of(key: &str) -> Option<String> {
        let k = key.as_bytes();
        shape(BASE, k)
            .namespace
            .map(|r| String::from_utf8_lossy(&k[r]).into_owned())
    }

    #[test]
    fn namespace_segment_follows_the_resource() {
        assert_eq!(
            ns_of("/registry/pods/default/web-1").as_deref(),
            Some("default")
        );
        assert_eq!(ns_of("/registry/namespaces/default"), None);
        assert_eq!(ns_of("/registry/minions/node1"), None);
        assert_eq!(
            ns_of("/registry/services/specs/ns/svc").as_deref(),
            Some("ns")
        );
        assert_eq!(
            ns_of("/registry/services/endpoints/ns/svc").as_deref(),
            Some("ns")
        );
        assert_eq!(ns_of("/registry/services/ns/svc").as_deref(), Some("ns"));
        assert_eq!(
            ns_of("/registry/example.com/widgets/team-a/w1").as_deref(),
            Some("team-a")
        );
        assert_eq!(
            ns_of("/registry/compute.gcp.crossplane.io/addresses/my-addr"),
            None
        );
        assert_eq!(
            ns_of("/registry/apiextensions.k8s.io/customresourcedefinitions/x.example.com"),
            None
        );
        assert_eq!(ns_of("/other/pods/default/web-1"), None);
    }

    #[test]
    fn placement_keys() {
        let key = b"/registry/events/kube-system/x.123";
        assert_eq!(
            placement_key(BASE, key, HashBy::Resource),
            b"/registry/events/"
        );
        assert_eq!(
            placement_key(BASE, key, HashBy::ResourceNamespace),
            b"/registry/events/kube-system/"
        );
        let cluster = b"/registry/namespaces/default";
        assert_eq!(
            placement_key(BASE, cluster, HashBy::ResourceNamespace),
            b"/registry/namespaces/"
        );
        assert_eq!(
            placement_key(BASE, b"/registry/health", HashBy::Resource),
            b""
        );
        assert_eq!(
            placement_key(
                BASE,
                b"/registry/a.io/things/ns/x",
                HashBy::ResourceNamespace
            ),
            b"/registry/a.io/things/ns/"
        );
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn covering_prefixes() {
        assert_eq!(
            covering_prefix(b"/registry/pods/", Some(b"/registry/pods0")),
            b"/registry/pods/"
        );
        assert_eq!(
            covering_prefix(b"/registry/pods/ns/web-5\0", Some(b"/registry/pods0")),
            b"/registry/pods/"
        );
        assert_eq!(covering_prefix(b"/registry/pods/", None), b"");
        assert_eq!(covering_prefix(b"\xff\xffa", None), b"\xff\xff");
        assert_eq!(covering_prefix(b"/a", Some(b"/b")), b"/a");
        assert_eq!(covering_prefix(b"/a", Some(b"/c")), b"/");
        assert_eq!(covering_prefix(b"abc", Some(b"abc\0")), b"abc");
    }

    #[test]
    fn services_resource_prefixes() {
        let p = resource_prefixes(BASE, "", "services", Some("kube-system"));
        assert_eq!(
            p,
            vec![
                b"/registry/services/specs/kube-system/".to_vec(),
                b"/registry/services/endpoints/kube-system/".to_vec(),
                b"/registry/services/kube-system/".to_vec(),
            ]
        );
        let p = resource_prefixes(BASE, "apps", "deployments", None);
        assert_eq!(p, vec![b"/registry/deployments/".to_vec()]);
        let p = resource_prefixes(BASE, "example.com", "widgets", Some("a"));
        assert_eq!(p, vec![b"/registry/example.com/widgets/a/".to_vec()]);
    }
}
