//! The topology file: TOML into checked [`Topology`], with every problem
//! reported at its line and column.

use std::collections::HashMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Compiled, DEFAULT_REGISTRY_PREFIX, Diagnostic, HashBy, Location, Matcher, Route, Shard,
    ShardId, Target, Topology, keys,
};
use crate::endpoint::Endpoint;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    registry_prefix: Option<Spanned<String>>,
    default_shard: Option<Spanned<String>>,
    #[serde(default)]
    shards: Vec<Spanned<RawShard>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    name: Spanned<String>,
    endpoint: Spanned<String>,
    max_connections: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: Option<Spanned<String>>,
    resource: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    regex: Option<Spanned<String>>,
    shard: Option<Spanned<String>>,
    shards: Option<Spanned<Vec<Spanned<String>>>>,
    hash: Option<Spanned<HashBy>>,
}

/// Collects diagnostics with their byte offsets.
struct Checker<'a> {
    text: &'a str,
    source: &'a str,
    found: Vec<(usize, String)>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.found.push((span.start, message.into()));
    }

    fn location(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            source: self.source.to_string(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn into_diagnostics(mut self) -> Vec<Diagnostic> {
        let mut found = std::mem::take(&mut self.found);
        found.sort_by_key(|(offset, _)| *offset);
        found
            .into_iter()
            .map(|(offset, message)| Diagnostic {
                location: self.location(offset),
                message,
            })
            .collect()
    }
}

/// The shard names known so far, for resolving references.
struct Names {
    ids: HashMap<String, (ShardId, usize)>,
    in_order: Vec<String>,
}

impl Names {
    fn list(&self) -> String {
        self.in_order
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn resolve(&self, checker: &mut Checker<'_>, name: &Spanned<String>) -> Option<ShardId> {
        match self.ids.get(name.get_ref()) {
            Some((id, _)) => Some(*id),
            None => {
                checker.error(
                    name.span(),
                    format!(
                        "unknown shard {:?}; the shards are {}",
                        name.get_ref(),
                        self.list()
                    ),
                );
                None
            }
        }
    }
}

pub(super) fn parse(text: &str, source: &str) -> Result<Topology, Vec<Diagnostic>> {
    let mut checker = Checker {
        text,
        source,
        found: Vec::new(),
    };
    let raw: RawTopology = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            checker.error(span, e.message().trim_end().to_string());
            return Err(checker.into_diagnostics());
        }
    };

    let registry_prefix = match raw.registry_prefix {
        None => DEFAULT_REGISTRY_PREFIX.to_string(),
        Some(prefix) => {
            if !prefix.get_ref().starts_with('/') {
                checker.error(
                    prefix.span(),
                    format!(
                        "registry_prefix {:?} must start with '/' (it is kube-apiserver's \
                         --etcd-prefix, by default \"/registry\")",
                        prefix.get_ref()
                    ),
                );
            }
            prefix.into_inner()
        }
    };
    let base = keys::registry_base(&registry_prefix);

    let (shards, names) = check_shards(&mut checker, raw.shards);

    let default_shard = match &raw.default_shard {
        None => {
            checker.error(
                0..0,
                "missing default_shard: name the shard of the keys no route matches, \
                 e.g. default_shard = \"core\"",
            );
            None
        }
        // "no shards" is reported already.
        Some(_) if names.in_order.is_empty() => None,
        Some(name) => names.resolve(&mut checker, name),
    };

    let mut routes = Vec::new();
    for route in raw.routes {
        if let Some(route) = check_route(&mut checker, &names, &base, route) {
            routes.push(route);
        }
    }

    match default_shard {
        Some(default_shard) if checker.found.is_empty() => Ok(Topology {
            registry_prefix,
            base,
            shards,
            routes,
            default_shard,
            source: Some(source.to_string()),
        }),
        _ => Err(checker.into_diagnostics()),
    }
}

fn valid_shard_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_shards(checker: &mut Checker<'_>, raw: Vec<Spanned<RawShard>>) -> (Vec<Shard>, Names) {
    let mut names = Names {
        ids: HashMap::new(),
        in_order: Vec::new(),
    };
    let mut shards = Vec::new();
    let mut databases: HashMap<String, (String, usize)> = HashMap::new();
    if raw.is_empty() {
        checker.error(
            0..0,
            "no shards: add a [[shards]] table (name and endpoint) for each database",
        );
    }
    for (index, shard) in raw.into_iter().enumerate() {
        let shard = shard.into_inner();
        let name = shard.name.get_ref().clone();
        let name_span = shard.name.span();
        if !valid_shard_name(&name) {
            checker.error(
                name_span.clone(),
                format!(
                    "shard name {name:?} must be non-empty and use only letters, digits, '_' and '-'"
                ),
            );
        }
        match names.ids.get(&name) {
            Some((_, first)) => {
                let first = checker.location(*first);
                checker.error(
                    name_span.clone(),
                    format!(
                        "duplicate shard name {name:?} (first defined at line {})",
                        first.line
                    ),
                );
            }
            None => {
                names
                    .ids
                    .insert(name.clone(), (ShardId(index), name_span.start));
                names.in_order.push(name.clone());
            }
        }
        if let Some(max) = &shard.max_connections
            && *max.get_ref() == 0
        {
            checker.error(max.span(), "max_connections must be at least 1");
        }
        match Endpoint::parse(shard.endpoint.get_ref()) {
            Err(e) => checker.error(shard.endpoint.span(), format!("shard {name:?}: {e}")),
            Ok(endpoint) => {
                if let Some(identity) = endpoint.identity() {
                    match databases.get(&identity) {
                        Some((other, offset)) => {
                            let line = checker.location(*offset).line;
                            checker.error(
                                shard.endpoint.span(),
                                format!(
                                    "shard {name:?} uses the same database as shard {other:?} \
                                     (line {line}); every shard needs its own database"
                                ),
                            );
                        }
                        None => {
                            databases.insert(identity, (name.clone(), shard.endpoint.span().start));
                        }
                    }
                }
                shards.push(Shard {
                    name,
                    endpoint,
                    max_connections: shard.max_connections.map(Spanned::into_inner),
                    location: Some(checker.location(name_span.start)),
                });
            }
        }
    }
    (shards, names)
}

/// Checks a name used inside keys: a resource, group or namespace segment.
fn check_segment(
    checker: &mut Checker<'_>,
    field: &str,
    value: &Spanned<String>,
    allow_dot: bool,
) -> bool {
    let v = value.get_ref();
    let problem = if v.is_empty() {
        Some("must not be empty")
    } else if v.contains('/') {
        Some("is one segment of the key and cannot contain '/'")
    } else if !allow_dot && v.contains('.') {
        Some(
            "cannot contain '.' (a first key segment with a dot is a group: for a custom \
             resource write group = \"<group>\" and resource = \"<plural>\")",
        )
    } else {
        None
    };
    match problem {
        Some(problem) => {
            checker.error(value.span(), format!("{field} {v:?} {problem}"));
            false
        }
        None => true,
    }
}

fn check_group(checker: &mut Checker<'_>, group: &Spanned<String>) -> bool {
    let g = group.get_ref();
    if keys::UNGROUPED_BUILTIN_GROUPS.contains(&g.as_str()) {
        return true;
    }
    if !check_segment(checker, "group", group, true) {
        return false;
    }
    if !g.contains('.') {
        checker.error(
            group.span(),
            format!(
                "group {g:?} is not an API group of kube-apiserver's built-in resources, and \
                 custom resource groups contain a dot (e.g. \"example.com\")"
            ),
        );
        return false;
    }
    true
}

fn check_matcher(
    checker: &mut Checker<'_>,
    base: &[u8],
    route_span: &Range<usize>,
    route: &RawRoute,
) -> Option<(Matcher, Compiled)> {
    let structural = [&route.resource, &route.namespace, &route.group]
        .into_iter()
        .flatten()
        .map(|f| f.span())
        .min_by_key(|s| s.start);
    let mut kinds: Vec<(&str, Range<usize>)> = [
        route.prefix.as_ref().map(|p| ("prefix", p.span())),
        route.regex.as_ref().map(|r| ("regex", r.span())),
        structural.map(|s| {
            let name = if route.resource.is_some() {
                "resource"
            } else if route.namespace.is_some() {
                "namespace"
            } else {
                "group"
            };
            (name, s)
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    kinds.sort_by_key(|(_, span)| span.start);
    match kinds.as_slice() {
        [] => {
            checker.error(
                route_span.clone(),
                "route without a matcher: give one of prefix, resource (with optional group \
                 and namespace), namespace or regex",
            );
            return None;
        }
        [_] => {}
        [(first, _), (second, span), ..] => {
            checker.error(
                span.clone(),
                format!(
                    "route has two kinds of matcher, `{first}` and `{second}`: a route matches \
                     by exactly one of prefix, resource (with optional group and namespace), \
                     namespace or regex; use one route for each"
                ),
            );
            return None;
        }
    }

    if let Some(prefix) = &route.prefix {
        let p = prefix.get_ref().clone();
        let compiled = Compiled::Prefixes(vec![p.as_bytes().to_vec()]);
        return Some((Matcher::Prefix(p), compiled));
    }
    if let Some(regex) = &route.regex {
        return match super::regex_match::RegexMatcher::new(regex.get_ref()) {
            Ok(compiled) => Some((
                Matcher::Regex(regex.get_ref().clone()),
                Compiled::Regex(Box::new(compiled)),
            )),
            Err(e) => {
                checker.error(regex.span(), format!("invalid regex: {}", one_line(&e)));
                None
            }
        };
    }

    let mut ok = true;
    if let Some(namespace) = &route.namespace {
        ok &= check_segment(checker, "namespace", namespace, true);
    }
    let group = match &route.group {
        None => String::new(),
        Some(group) => {
            ok &= check_group(checker, group);
            if route.resource.is_none() {
                checker.error(
                    group.span(),
                    "`group` needs `resource`: a route matches one resource of a group; \
                     for a whole custom resource group use prefix = \"/registry/<group>/\"",
                );
                ok = false;
            }
            match group.get_ref().as_str() {
                "core" => String::new(),
                g => g.to_string(),
            }
        }
    };
    if let Some(resource) = &route.resource {
        ok &= check_segment(checker, "resource", resource, false);
    }
    if !ok {
        return None;
    }
    let namespace = route.namespace.as_ref().map(|n| n.get_ref().clone());
    match &route.resource {
        Some(resource) => {
            let resource = resource.get_ref().clone();
            let prefixes = keys::resource_prefixes(base, &group, &resource, namespace.as_deref());
            Some((
                Matcher::Resource {
                    group,
                    resource,
                    namespace,
                },
                Compiled::Prefixes(prefixes),
            ))
        }
        None => {
            let namespace = namespace.unwrap_or_default();
            let compiled = Compiled::Namespace(namespace.as_bytes().to_vec());
            Some((Matcher::Namespace(namespace), compiled))
        }
    }
}

/// The regex crate's syntax errors draw a caret under the pattern over
/// several lines; a diagnostic is one line.
fn one_line(error: &regex::Error) -> String {
    let text = error.to_string();
    match text.rsplit_once("error: ") {
        Some((_, reason)) => reason.trim().to_string(),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn check_target(
    checker: &mut Checker<'_>,
    names: &Names,
    route_span: &Range<usize>,
    route: &RawRoute,
) -> Option<Target> {
    match (&route.shard, &route.shards) {
        (Some(_), Some(list)) => {
            checker.error(
                list.span(),
                "give either shard = \"name\" or shards = [...], not both",
            );
            None
        }
        (None, None) => {
            checker.error(
                route_span.clone(),
                "route without a target: give shard = \"name\" or shards = [\"a\", \"b\", ...]",
            );
            None
        }
        (Some(shard), None) => {
            if let Some(hash) = &route.hash {
                checker.error(
                    hash.span(),
                    "`hash` applies to shards = [...] only: a route with one shard does not hash",
                );
            }
            names.resolve(checker, shard).map(Target::Shard)
        }
        (None, Some(list)) => {
            if list.get_ref().is_empty() {
                checker.error(list.span(), "`shards` is empty: list at least one shard");
                return None;
            }
            let mut ids = Vec::new();
            let mut ok = true;
            for name in list.get_ref() {
                match names.resolve(checker, name) {
                    Some(id) if ids.contains(&id) => {
                        checker.error(
                            name.span(),
                            format!("shard {:?} is listed twice", name.get_ref()),
                        );
                        ok = false;
                    }
                    Some(id) => ids.push(id),
                    None => ok = false,
                }
            }
            let hash = route
                .hash
                .as_ref()
                .map(|h| *h.get_ref())
                .unwrap_or_default();
            ok.then_some(Target::Hashed { shards: ids, hash })
        }
    }
}

fn check_route(
    checker: &mut Checker<'_>,
    names: &Names,
    base: &[u8],
    route: Spanned<RawRoute>,
) -> Option<Route> {
    let span = route.span();
    let route = route.into_inner();
    let matcher = check_matcher(checker, base, &span, &route);
    let target = check_target(checker, names, &span, &route);
    let (matcher, compiled) = matcher?;
    Some(Route {
        matcher,
        target: target?,
        location: Some(checker.location(span.start)),
        compiled,
    })
}
