//! Tests of the topology file, routing, placement and range analysis.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

/// The example of the issue, which must work exactly as written.
const MINIMAL: &str = r#"default_shard = "core"

[[shards]]
name = "core"
endpoint = "sqlite:///var/lib/kubeshard/core.db"

[[shards]]
name = "pods"
endpoint = "postgres://postgres@127.0.0.1:5432/pods"

[[routes]]
prefix = "/registry/pods/"
shard = "pods"
"#;

fn topology(text: &str) -> Topology {
    match Topology::from_toml_str(text, "test.toml") {
        Ok(t) => t,
        Err(e) => panic!("topology refused:\n{e}"),
    }
}

fn name(t: &Topology, id: ShardId) -> &str {
    &t.shard(id).name
}

fn route_name<'t>(t: &'t Topology, key: &str) -> &'t str {
    name(t, t.route(key.as_bytes()))
}

fn names(t: &Topology, ids: &[ShardId]) -> Vec<String> {
    ids.iter().map(|&id| name(t, id).to_string()).collect()
}

/// The diagnostics of a refused topology, rendered.
fn errors(text: &str) -> Vec<String> {
    match Topology::from_toml_str(text, "bad.toml") {
        Ok(_) => panic!("topology accepted:\n{text}"),
        Err(TopologyError::Invalid(d)) => d.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn one_error(text: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

fn assert_error(text: &str, location: &str, contains: &str) {
    let error = one_error(text);
    assert!(
        error.starts_with(&format!("bad.toml:{location}: ")) && error.contains(contains),
        "expected bad.toml:{location}: ...{contains}..., got {error}"
    );
}

const TWO_SHARDS: &str = r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
[[shards]]
name = "pods"
endpoint = "sqlite://pods.db"
"#;

// ---------------------------------------------------------------- parsing

#[test]
fn minimal_example_works_as_written() {
    let t = topology(MINIMAL);
    assert_eq!(t.shards().len(), 2);
    assert_eq!(name(&t, t.default_shard()), "core");
    assert_eq!(t.registry_prefix(), "/registry");
    assert_eq!(t.source(), Some("test.toml"));
    assert_eq!(
        t.shard(ShardId(1)).endpoint,
        Endpoint::parse("postgres://postgres@127.0.0.1:5432/pods").unwrap()
    );
    assert_eq!(t.routes().len(), 1);
    assert_eq!(
        t.routes()[0].matcher(),
        &Matcher::Prefix("/registry/pods/".into())
    );
    assert_eq!(t.routes()[0].target(), &Target::Shard(ShardId(1)));
    let route_location = t.routes()[0].location().unwrap();
    assert_eq!((route_location.line, route_location.column), (11, 1));
    let shard_location = t.shard(ShardId(1)).location.clone().unwrap();
    assert_eq!(shard_location.to_string(), "test.toml:8:8");
    assert_eq!(route_name(&t, "/registry/pods/default/web-1"), "pods");
    assert_eq!(route_name(&t, "/registry/podsecuritypolicy/x"), "core");
    assert_eq!(route_name(&t, "/registry/configmaps/ns/cm"), "core");
    assert_eq!(route_name(&t, "compact_rev_key"), "core");
}

#[test]
fn single_is_one_default_shard() {
    let endpoint = Endpoint::parse("sqlite://./db/state.db").unwrap();
    let t = Topology::single(endpoint.clone());
    assert_eq!(t.shards().len(), 1);
    assert_eq!(t.shard(t.default_shard()).name, SINGLE_SHARD_NAME);
    assert_eq!(t.shard(t.default_shard()).endpoint, endpoint);
    assert!(t.routes().is_empty());
    assert_eq!(t.route(b"/registry/pods/a/b"), ShardId(0));
    assert_eq!(t.shards_for_range(b"\0", None), vec![ShardId(0)]);
}

#[test]
fn from_file_reads_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeshard.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let t = Topology::from_file(&path).unwrap();
    assert_eq!(t.source(), Some(path.display().to_string().as_str()));

    std::fs::write(
        &path,
        MINIMAL.replace("shard = \"pods\"", "shard = \"podz\""),
    )
    .unwrap();
    let error = Topology::from_file(&path).unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "{}:13:9: unknown shard \"podz\"; the shards are \"core\", \"pods\"",
            path.display()
        )
    );

    let missing = dir.path().join("missing.toml");
    let Err(error @ TopologyError::Read { .. }) = Topology::from_file(&missing) else {
        panic!("missing file accepted");
    };
    assert!(error.to_string().starts_with("cannot read topology file "));
}

#[test]
fn extra_shard_settings_and_registry_prefix() {
    let t = topology(
        r#"registry_prefix = "/k8s/"
default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
max_connections = 8
[[routes]]
resource = "pods"
shard = "core"
"#,
    );
    assert_eq!(t.shard(ShardId(0)).max_connections, Some(8));
    assert_eq!(t.registry_prefix(), "/k8s/");
    let Compiled::Prefixes(prefixes) = &t.routes()[0].compiled else {
        panic!("resource matcher not compiled to prefixes");
    };
    assert_eq!(prefixes, &vec![b"/k8s/pods/".to_vec()]);
}

// ---------------------------------------------------------------- errors

/// Databases of one name on two servers, told apart by socket or port.
#[test]
fn same_database_name_on_two_servers_is_two_databases() {
    for (a, b) in [
        (
            "mysql://u:p@unix(/run/a/mysqld.sock)/k8s",
            "mysql://u:p@unix(/run/b/mysqld.sock)/k8s",
        ),
        (
            "postgres://u:p@/k8s?host=/run/a",
            "postgres://u:p@/k8s?host=/run/b",
        ),
        (
            "postgres://u:p@/k8s?host=/run/a",
            "postgres://u:p@localhost/k8s",
        ),
        ("postgres://u:p@db:5432/k8s", "postgres://u:p@db:5433/k8s"),
    ] {
        let t = topology(
            &TWO_SHARDS
                .replace("sqlite://core.db", a)
                .replace("sqlite://pods.db", b),
        );
        assert_eq!(t.shards.len(), 2, "{a} and {b}");
    }
}

#[test]
fn error_unknown_shard_in_route() {
    let text = format!("{TWO_SHARDS}[[routes]]\nprefix = \"/registry/pods/\"\nshard = \"podz\"\n");
    assert_error(
        &text,
        "10:9",
        "unknown shard \"podz\"; the shards are \"core\", \"pods\"",
    );
    let text =
        format!("{TWO_SHARDS}[[routes]]\nresource = \"events\"\nshards = [\"core\", \"evts\"]\n");
    assert_error(&text, "10:19", "unknown shard \"evts\"");
}

#[test]
fn error_duplicate_shard_name() {
    let text = format!("{TWO_SHARDS}[[shards]]\nname = \"pods\"\nendpoint = \"sqlite://p2.db\"\n");
    assert_error(
        &text,
        "9:8",
        "duplicate shard name \"pods\" (first defined at line 6)",
    );
}

#[test]
fn error_missing_default_shard() {
    let text = TWO_SHARDS.replace("default_shard = \"core\"\n", "");
    assert_error(&text, "1:1", "missing default_shard");
}

#[test]
fn error_unknown_default_shard() {
    let text = TWO_SHARDS.replace("default_shard = \"core\"", "default_shard = \"main\"");
    assert_error(&text, "1:17", "unknown shard \"main\"");
}

#[test]
fn error_two_matcher_kinds() {
    let text = format!(
        "{TWO_SHARDS}[[routes]]\nprefix = \"/registry/pods/\"\nresource = \"pods\"\nshard = \"pods\"\n"
    );
    assert_error(
        &text,
        "10:12",
        "route has two kinds of matcher, `prefix` and `resource`",
    );
    let text =
        format!("{TWO_SHARDS}[[routes]]\nnamespace = \"a\"\nregex = \"^/x\"\nshard = \"pods\"\n");
    assert_error(
        &text,
        "10:9",
        "route has two kinds of matcher, `namespace` and `regex`",
    );
}

#[test]
fn error_no_matcher() {
    let text = format!("{TWO_SHARDS}[[routes]]\nshard = \"pods\"\n");
    assert_error(&text, "8:1", "route without a matcher");
}

#[test]
fn error_bad_regex() {
    let text = format!("{TWO_SHARDS}[[routes]]\nregex = \"^/registry/(pods\"\nshard = \"pods\"\n");
    assert_error(&text, "9:9", "invalid regex: unclosed group");
}

#[test]
fn error_empty_shards_list() {
    let text = format!("{TWO_SHARDS}[[routes]]\nresource = \"events\"\nshards = []\n");
    assert_error(&text, "10:10", "`shards` is empty");
}

#[test]
fn error_bad_endpoint() {
    let text = TWO_SHARDS.replace("sqlite://pods.db", "postgres://u@host:5432/");
    assert_error(
        &text,
        "7:12",
        "shard \"pods\": endpoint \"postgres://u@host:5432/\": no database name",
    );
    let text = TWO_SHARDS.replace("sqlite://pods.db", "redis://host/0");
    assert_error(&text, "7:12", "unknown scheme");
}

#[test]
fn error_unknown_field() {
    let text = format!("{TWO_SHARDS}[[routes]]\nnamespce = \"a\"\nshard = \"pods\"\n");
    assert_error(&text, "9:1", "unknown field `namespce`");
    let text = format!("defualt_shard = \"core\"\n{TWO_SHARDS}");
    assert_error(&text, "1:1", "unknown field `defualt_shard`");
    let text = TWO_SHARDS.replace("name = \"pods\"", "name = \"pods\"\npool = 3");
    assert_error(&text, "7:1", "unknown field `pool`");
}

#[test]
fn error_toml_syntax() {
    let text = TWO_SHARDS.replace("name = \"pods\"", "name = pods");
    assert_error(&text, "6:8", "");
}

#[test]
fn error_other_cases() {
    let route = |body: &str| format!("{TWO_SHARDS}[[routes]]\n{body}\n");
    assert_error(
        &route("group = \"example.com\"\nshard = \"pods\""),
        "9:9",
        "`group` needs `resource`",
    );
    assert_error(
        &route("group = \"widgets\"\nresource = \"things\"\nshard = \"pods\""),
        "9:9",
        "custom resource groups contain a dot",
    );
    assert_error(
        &route("resource = \"widgets.example.com\"\nshard = \"pods\""),
        "9:12",
        "cannot contain '.'",
    );
    assert_error(
        &route("namespace = \"a/b\"\nshard = \"pods\""),
        "9:13",
        "cannot contain '/'",
    );
    assert_error(
        &route("resource = \"\"\nshard = \"pods\""),
        "9:12",
        "must not be empty",
    );
    assert_error(
        &route("prefix = \"/a/\"\nshard = \"pods\"\nshards = [\"core\"]"),
        "11:10",
        "not both",
    );
    assert_error(&route("prefix = \"/a/\""), "8:1", "route without a target");
    assert_error(
        &route("prefix = \"/a/\"\nshard = \"pods\"\nhash = \"resource\""),
        "11:8",
        "`hash` applies to shards",
    );
    assert_error(
        &route("prefix = \"/a/\"\nshards = [\"pods\", \"core\", \"pods\"]"),
        "10:27",
        "shard \"pods\" is listed twice",
    );
    assert_error(
        &route("prefix = \"/a/\"\nshards = [\"pods\"]\nhash = \"namespace\""),
        "11:8",
        "unknown variant `namespace`",
    );
    assert_error(
        &TWO_SHARDS.replace("name = \"pods\"", "name = \"po ds\""),
        "6:8",
        "shard name \"po ds\" must be non-empty and use only letters",
    );
    assert_error(
        &TWO_SHARDS.replace("sqlite://pods.db", "sqlite://./core.db"),
        "7:12",
        "shard \"pods\" uses the same database as shard \"core\" (line 4)",
    );
    // One MariaDB database named through its socket in kine's form and sqlx's.
    assert_error(
        &TWO_SHARDS
            .replace(
                "sqlite://core.db",
                "mysql://u:p@unix(/run/mysqld/mysqld.sock)/k8s",
            )
            .replace(
                "sqlite://pods.db",
                "mysql://u:p@localhost/k8s?socket=/run/mysqld/mysqld.sock",
            ),
        "7:12",
        "shard \"pods\" uses the same database as shard \"core\" (line 4)",
    );
    assert_error(
        &TWO_SHARDS.replace("name = \"pods\"", "name = \"pods\"\nmax_connections = 0"),
        "7:19",
        "max_connections must be at least 1",
    );
    assert_error(
        &format!("registry_prefix = \"registry\"\n{TWO_SHARDS}"),
        "1:19",
        "must start with '/'",
    );
    assert_error("default_shard = \"core\"\n", "1:1", "no shards");
}

#[test]
fn every_error_is_reported_in_file_order() {
    let text = format!(
        "{TWO_SHARDS}[[routes]]\nprefix = \"/a/\"\nshard = \"x\"\n\
         [[routes]]\nregex = \"(\"\nshard = \"y\"\n"
    )
    .replace("default_shard = \"core\"", "default_shard = \"z\"");
    let errors = errors(&text);
    let locations: Vec<&str> = errors
        .iter()
        .map(|e| e.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        locations,
        [
            "bad.toml:1:17",
            "bad.toml:10:9",
            "bad.toml:12:9",
            "bad.toml:13:9"
        ],
        "{errors:#?}"
    );
    let Err(e) = Topology::from_toml_str(&text, "bad.toml") else {
        panic!("accepted");
    };
    assert_eq!(e.to_string().lines().count(), 4);
}

// ---------------------------------------------------------------- matchers

const MATCHERS: &str = r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
[[shards]]
name = "pods"
endpoint = "sqlite://pods.db"
[[shards]]
name = "system"
endpoint = "sqlite://system.db"
[[shards]]
name = "apps"
endpoint = "sqlite://apps.db"
[[shards]]
name = "crd"
endpoint = "sqlite://crd.db"
[[shards]]
name = "gcp"
endpoint = "sqlite://gcp.db"
[[shards]]
name = "leases"
endpoint = "sqlite://leases.db"

[[routes]]
resource = "pods"
namespace = "kube-system"
shard = "system"

[[routes]]
resource = "pods"
shard = "pods"

[[routes]]
resource = "leases"
group = "coordination.k8s.io"
shard = "leases"

[[routes]]
namespace = "kube-system"
shard = "system"

[[routes]]
group = "apps"
resource = "deployments"
shard = "apps"

[[routes]]
group = "apiextensions.k8s.io"
resource = "customresourcedefinitions"
shard = "crd"

[[routes]]
group = "example.com"
resource = "widgets"
shard = "crd"

[[routes]]
regex = '^/registry/[^/]+\.gcp\.crossplane\.io/'
shard = "gcp"
"#;

#[test]
fn matchers_follow_the_kubernetes_layout_first_match_wins() {
    let t = topology(MATCHERS);
    let expect = [
        ("/registry/pods/kube-system/coredns-1", "system"),
        ("/registry/pods/default/web-1", "pods"),
        ("/registry/leases/kube-node-lease/node1", "leases"),
        ("/registry/leases/kube-system/kube-scheduler", "leases"),
        ("/registry/configmaps/kube-system/cm", "system"),
        ("/registry/services/specs/kube-system/kube-dns", "system"),
        (
            "/registry/services/endpoints/kube-system/kube-dns",
            "system",
        ),
        ("/registry/services/specs/default/kubernetes", "core"),
        ("/registry/events/kube-system/x.123", "system"),
        ("/registry/example.com/widgets/kube-system/w", "system"),
        // Cluster-scoped: no namespace segment.
        ("/registry/namespaces/kube-system", "core"),
        ("/registry/minions/kube-system", "core"),
        ("/registry/deployments/default/web", "apps"),
        (
            "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com",
            "crd",
        ),
        ("/registry/example.com/widgets/team-a/w1", "crd"),
        ("/registry/example.com/widgets/cluster-w", "crd"),
        ("/registry/example.com/gadgets/team-a/g1", "core"),
        (
            "/registry/compute.gcp.crossplane.io/addresses/my-addr",
            "gcp",
        ),
        (
            "/registry/compute.aws.crossplane.io/addresses/my-addr",
            "core",
        ),
        ("/registry/podtemplates/default/t", "core"),
        ("/other/pods/kube-system/x", "core"),
        ("", "core"),
    ];
    for (key, shard) in expect {
        assert_eq!(route_name(&t, key), shard, "{key}");
    }
    assert_eq!(
        t.matching_route(b"/registry/pods/default/web-1")
            .map(|r| r.location().unwrap().line),
        Some(29)
    );
    assert!(t.matching_route(b"/registry/secrets/default/s").is_none());
}

#[test]
fn regex_searches_the_whole_key_as_bytes() {
    let t = topology(&format!(
        "{TWO_SHARDS}[[routes]]\nregex = 'secret'\nshard = \"pods\"\n"
    ));
    assert_eq!(route_name(&t, "/registry/secrets/ns/s"), "pods");
    assert_eq!(
        route_name(&t, "/registry/configmaps/ns/my-secret-cm"),
        "pods"
    );
    assert_eq!(name(&t, t.route(b"/registry/\xff/secret")), "pods");
    assert_eq!(route_name(&t, "/registry/configmaps/ns/cm"), "core");
}

#[test]
fn registry_prefix_moves_resource_matchers() {
    let t = topology(&format!(
        "registry_prefix = \"/k8s.example.com\"\n{TWO_SHARDS}[[routes]]\n\
         resource = \"pods\"\nshard = \"pods\"\n[[routes]]\nnamespace = \"kube-system\"\nshard = \"pods\"\n"
    ));
    assert_eq!(route_name(&t, "/k8s.example.com/pods/a/b"), "pods");
    assert_eq!(
        route_name(&t, "/k8s.example.com/secrets/kube-system/b"),
        "pods"
    );
    assert_eq!(route_name(&t, "/registry/pods/a/b"), "core");
    assert_eq!(route_name(&t, "/registry/secrets/kube-system/b"), "core");
}

// ---------------------------------------------------------------- placement

/// Pinned placement: these expectations are literal on purpose. If this test
/// fails, the hash, the placement key or the tie-break changed, and every
/// existing deployment would find its keys on the wrong shards.
const GOLDEN: &str = r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
[[shards]]
name = "events-1"
endpoint = "sqlite://events-1.db"
[[shards]]
name = "events-2"
endpoint = "sqlite://events-2.db"
[[shards]]
name = "events-3"
endpoint = "sqlite://events-3.db"
[[shards]]
name = "big-a"
endpoint = "sqlite://big-a.db"
[[shards]]
name = "big-b"
endpoint = "sqlite://big-b.db"
[[shards]]
name = "big-c"
endpoint = "sqlite://big-c.db"

[[routes]]
resource = "events"
shards = ["events-1", "events-2", "events-3"]
hash = "resource-namespace"

[[routes]]
prefix = "/registry/"
shards = ["big-a", "big-b", "big-c"]
"#;

#[test]
fn golden_placement() {
    let t = topology(GOLDEN);
    let golden = [
        ("/registry/events/default/web-1.17a", "events-1"),
        ("/registry/events/default/web-2.17b", "events-1"),
        ("/registry/events/kube-system/coredns.1", "events-1"),
        ("/registry/events/kube-node-lease/x", "events-1"),
        ("/registry/events/team-a/job.1", "events-2"),
        ("/registry/events/team-b/job.1", "events-3"),
        ("/registry/events/team-c/job.1", "events-3"),
        ("/registry/events/team-d/job.1", "events-1"),
        ("/registry/events/ns-0/e", "events-2"),
        ("/registry/events/ns-1/e", "events-1"),
        ("/registry/events/ns-2/e", "events-1"),
        ("/registry/events/ns-3/e", "events-3"),
        ("/registry/events/cluster-event", "events-2"),
        ("/registry/pods/default/web-1", "big-c"),
        ("/registry/pods/kube-system/coredns-1", "big-c"),
        ("/registry/configmaps/default/cm", "big-c"),
        ("/registry/secrets/default/s", "big-c"),
        ("/registry/namespaces/default", "big-c"),
        ("/registry/minions/node1", "big-b"),
        ("/registry/leases/kube-node-lease/node1", "big-a"),
        ("/registry/services/specs/default/kubernetes", "big-a"),
        ("/registry/services/endpoints/default/kubernetes", "big-a"),
        ("/registry/deployments/default/web", "big-c"),
        ("/registry/replicasets/default/web-1", "big-c"),
        (
            "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com",
            "big-b",
        ),
        (
            "/registry/apiregistration.k8s.io/apiservices/v1.apps",
            "big-c",
        ),
        ("/registry/example.com/widgets/team-a/w1", "big-c"),
        (
            "/registry/compute.gcp.crossplane.io/addresses/my-addr",
            "big-c",
        ),
        ("/registry/health", "big-a"),
        ("/other/key", "core"),
    ];
    let mut wrong = Vec::new();
    for (key, expected) in golden {
        let got = route_name(&t, key);
        if got != expected {
            wrong.push(format!("(\"{key}\", \"{got}\"),"));
        }
    }
    assert!(wrong.is_empty(), "placement changed:\n{}", wrong.join("\n"));
    // The raw score, pinned too.
    assert_eq!(
        placement::score("events-1", b"/registry/events/default/"),
        xxhash_rust::xxh3::xxh3_64(b"events-1\0/registry/events/default/")
    );
}

#[test]
fn hash_by_resource_keeps_a_resource_whole() {
    let t = topology(GOLDEN);
    for resource in ["pods", "secrets", "example.com/widgets", "leases"] {
        let first = t.route(format!("/registry/{resource}/ns-0/x").as_bytes());
        for i in 0..50 {
            let key = format!("/registry/{resource}/ns-{i}/obj-{i}");
            assert_eq!(t.route(key.as_bytes()), first, "{key}");
        }
        assert_eq!(
            t.route(format!("/registry/{resource}/cluster").as_bytes()),
            first
        );
    }
}

#[test]
fn hash_by_namespace_spreads_namespaces_evenly() {
    let t = topology(GOLDEN);
    let mut counts = [0usize; 7];
    for i in 0..3000 {
        let ns = format!("/registry/events/namespace-{i}/");
        let shard = t.route(format!("{ns}e1").as_bytes());
        assert_eq!(t.route(format!("{ns}e2.xyz").as_bytes()), shard);
        counts[shard.index()] += 1;
    }
    assert_eq!(counts[0] + counts[4] + counts[5] + counts[6], 0);
    for count in &counts[1..4] {
        assert!((850..1150).contains(count), "unbalanced: {counts:?}");
    }
}

#[test]
fn adding_a_shard_moves_keys_only_to_it() {
    let before = topology(GOLDEN);
    let after = topology(
        &(GOLDEN
            .replace(
                "shards = [\"events-1\", \"events-2\", \"events-3\"]",
                "shards = [\"events-1\", \"events-4\", \"events-2\", \"events-3\"]",
            )
            .replace(
                "shards = [\"big-a\", \"big-b\", \"big-c\"]",
                "shards = [\"big-c\", \"big-a\", \"big-d\", \"big-b\"]",
            )
            + "[[shards]]\nname = \"events-4\"\nendpoint = \"sqlite://e4.db\"\n\
               [[shards]]\nname = \"big-d\"\nendpoint = \"sqlite://bd.db\"\n"),
    );
    let mut moved = 0;
    let total = 2000;
    for i in 0..total {
        for key in [
            format!("/registry/events/ns-{i}/e"),
            format!("/registry/group-{i}.example.com/things/ns/x"),
        ] {
            let old = name(&before, before.route(key.as_bytes()));
            let new = name(&after, after.route(key.as_bytes()));
            if old != new {
                assert!(new == "events-4" || new == "big-d", "{key}: {old} -> {new}");
                moved += 1;
            }
        }
    }
    // About a quarter of the keys move to the new shard of 4.
    assert!(
        (800..1200).contains(&moved),
        "{moved} of {} moved",
        2 * total
    );
}

// ---------------------------------------------------------------- ranges

fn range_names(t: &Topology, start: &str, end: Option<&str>) -> Vec<String> {
    names(
        t,
        &t.shards_for_range(start.as_bytes(), end.map(str::as_bytes)),
    )
}

fn prefix_names(t: &Topology, prefix: &str) -> Vec<String> {
    let end = keys::prefix_end(prefix.as_bytes());
    names(t, &t.shards_for_range(prefix.as_bytes(), end.as_deref()))
}

#[test]
fn ranges_are_tight_for_kubernetes_lists() {
    let t = topology(GOLDEN);
    let all: Vec<String> = t.shards().iter().map(|s| s.name.clone()).collect();
    let events = ["events-1", "events-2", "events-3"];
    assert_eq!(prefix_names(&t, "/registry/events/"), events);
    assert_eq!(prefix_names(&t, "/registry/events/default/"), ["events-1"]);
    assert_eq!(prefix_names(&t, "/registry/events/ns-1/"), ["events-1"]);
    // "ns-1" without its '/' also covers ns-10, ns-11, ...
    assert_eq!(prefix_names(&t, "/registry/events/ns-1"), events);
    assert_eq!(prefix_names(&t, "/registry/pods/"), ["big-c"]);
    assert_eq!(prefix_names(&t, "/registry/pods/ns1/"), ["big-c"]);
    assert_eq!(prefix_names(&t, "/registry/minions/"), ["big-b"]);
    assert_eq!(
        prefix_names(&t, "/registry/example.com/widgets/"),
        ["big-c"]
    );
    assert_eq!(
        prefix_names(&t, "/registry/"),
        [
            "events-1", "events-2", "events-3", "big-a", "big-b", "big-c"
        ]
    );
    assert_eq!(range_names(&t, "\0", None), all);
    assert_eq!(range_names(&t, "", None), all);
    // A paginated list continuing after a key.
    assert_eq!(
        range_names(&t, "/registry/pods/ns/web-5\0", Some("/registry/pods0")),
        ["big-c"]
    );
    // One key, and empty ranges.
    assert_eq!(
        range_names(
            &t,
            "/registry/events/default/x",
            Some("/registry/events/default/x\0")
        ),
        ["events-1"]
    );
    assert!(range_names(&t, "/b", Some("/a")).is_empty());
    assert!(range_names(&t, "/a", Some("/a")).is_empty());
    assert_eq!(prefix_names(&t, "/other/"), ["core"]);

    let t = topology(MATCHERS);
    assert_eq!(prefix_names(&t, "/registry/pods/"), ["pods", "system"]);
    assert_eq!(prefix_names(&t, "/registry/pods/default/"), ["pods"]);
    assert_eq!(prefix_names(&t, "/registry/pods/kube-system/"), ["system"]);
    assert_eq!(
        prefix_names(&t, "/registry/configmaps/kube-system/"),
        ["system"]
    );
    // The regex route cannot match under a group without a dot...
    assert_eq!(prefix_names(&t, "/registry/configmaps/default/"), ["core"]);
    // ...matches everything under its groups (so the default is not asked;
    // the namespace route before it may match some)...
    assert_eq!(
        prefix_names(&t, "/registry/s3.gcp.crossplane.io/buckets/"),
        ["system", "gcp"]
    );
    // ...and may match some of a group not complete yet.
    assert_eq!(
        prefix_names(&t, "/registry/s3.gcp"),
        ["core", "system", "gcp"]
    );
    assert_eq!(
        prefix_names(&t, "/registry/deployments/"),
        ["system", "apps"]
    );
    assert_eq!(prefix_names(&t, "/registry/leases/"), ["leases"]);
}

#[test]
fn hashed_routes_narrow_by_what_they_match() {
    // A range wider than the route: the route's own prefix fixes the
    // placement key, so only one of its shards can hold keys of the range.
    let t = topology(
        r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
[[shards]]
name = "a"
endpoint = "sqlite://a.db"
[[shards]]
name = "b"
endpoint = "sqlite://b.db"
[[shards]]
name = "c"
endpoint = "sqlite://c.db"
[[routes]]
resource = "pods"
shards = ["a", "b", "c"]
[[routes]]
resource = "configmaps"
namespace = "kube-system"
shards = ["a", "b", "c"]
hash = "resource-namespace"
"#,
    );
    let pods = name(&t, t.route(b"/registry/pods/ns/p")).to_string();
    let cms = name(&t, t.route(b"/registry/configmaps/kube-system/c")).to_string();
    let mut expected = vec!["core".to_string(), pods, cms];
    expected.sort_by_key(|n| t.shard_by_name(n));
    expected.dedup();
    assert_eq!(prefix_names(&t, "/registry/"), expected);
    assert_eq!(range_names(&t, "", None), expected);
}

#[test]
fn etcd_range_encoding() {
    let t = topology(GOLDEN);
    let all: Vec<ShardId> = t.shard_ids().collect();
    assert_eq!(t.shards_for_etcd_range(b"\0", b"\0"), all);
    assert_eq!(
        names(
            &t,
            &t.shards_for_etcd_range(b"/registry/events/default/x", b"")
        ),
        ["events-1"]
    );
    assert_eq!(
        names(
            &t,
            &t.shards_for_etcd_range(b"/registry/pods/", b"/registry/pods0")
        ),
        ["big-c"]
    );
}

#[test]
fn documented_examples_parse() {
    let doc = include_str!("../../../docs/topology.md");
    let mut count = 0;
    for block in doc.split("```toml\n").skip(1) {
        let Some((text, _)) = block.split_once("```") else {
            panic!("unterminated block");
        };
        topology(text);
        count += 1;
    }
    assert!(count >= 5, "{count} examples");
    let example = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split_once("```"))
        .map(|(text, _)| text)
        .unwrap();
    assert_eq!(example, MINIMAL);
}

// ---------------------------------------------------------------- property

const RICH: &str = r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite://core.db"
[[shards]]
name = "pods"
endpoint = "sqlite://pods.db"
[[shards]]
name = "ev-a"
endpoint = "sqlite://ev-a.db"
[[shards]]
name = "ev-b"
endpoint = "sqlite://ev-b.db"
[[shards]]
name = "ev-c"
endpoint = "sqlite://ev-c.db"
[[shards]]
name = "kube"
endpoint = "sqlite://kube.db"
[[shards]]
name = "crd-a"
endpoint = "sqlite://crd-a.db"
[[shards]]
name = "crd-b"
endpoint = "sqlite://crd-b.db"
[[shards]]
name = "misc"
endpoint = "sqlite://misc.db"

[[routes]]
resource = "pods"
namespace = "ns1"
shard = "kube"
[[routes]]
prefix = "/registry/pods/"
shard = "pods"
[[routes]]
resource = "events"
shards = ["ev-a", "ev-b", "ev-c"]
hash = "resource-namespace"
[[routes]]
namespace = "kube-system"
shard = "kube"
[[routes]]
group = "a.io"
resource = "widgets"
shards = ["crd-a", "crd-b"]
hash = "resource-namespace"
[[routes]]
regex = '^/registry/[^/]*\.io/x'
shards = ["crd-a", "crd-b", "misc"]
[[routes]]
resource = "services"
namespace = "ns1"
shards = ["misc", "ev-a"]
hash = "resource-namespace"
[[routes]]
namespace = "ns2"
shards = ["ev-a", "ev-b", "ev-c", "misc"]
hash = "resource-namespace"
[[routes]]
prefix = "/other"
shards = ["pods", "misc"]
[[routes]]
prefix = "/registry/"
shards = ["crd-a", "crd-b", "misc"]
hash = "resource-namespace"
"#;

const RICH_OTHER_PREFIX: &str = r#"registry_prefix = "/"
default_shard = "b"
[[shards]]
name = "a"
endpoint = "sqlite://a.db"
[[shards]]
name = "b"
endpoint = "sqlite://b.db"
[[shards]]
name = "c"
endpoint = "sqlite://c.db"
[[routes]]
namespace = "ns1"
shard = "a"
[[routes]]
resource = "services"
shards = ["a", "c"]
hash = "resource-namespace"
[[routes]]
resource = "pods"
namespace = "kube-system"
shard = "c"
[[routes]]
prefix = "/a.io/"
shards = ["a", "b", "c"]
hash = "resource-namespace"
"#;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "registry", "other", "pods", "events", "services", "specs", "endpoints",
            "kube-system", "ns1", "ns2", "ns", "a.io", "widgets", "x", "", "leases",
        ])
        .prop_map(String::from),
        1 => "[a-z.12-]{0,3}",
    ]
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::bool::weighted(0.9),
        prop::collection::vec(segment(), 0..6),
        prop::bool::ANY,
        prop::collection::vec(
            prop::sample::select(vec![0u8, b'/', b'.', b'a', b'n', b's', b'z', 0xff]),
            0..3,
        ),
    )
        .prop_map(|(slash, segments, trailing, tail)| {
            let mut key = Vec::new();
            if slash {
                key.push(b'/');
            }
            key.extend_from_slice(segments.join("/").as_bytes());
            if trailing {
                key.push(b'/');
            }
            key.extend(tail);
            key
        })
}

/// A range: [start, end) with end one of: unbounded, the prefix end of a
/// prefix of start, another key, the single-key end.
fn range() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    (key(), key(), 0..4u8, any::<prop::sample::Index>()).prop_map(|(start, other, kind, cut)| {
        match kind {
            0 => (start, None),
            1 => {
                let prefix = start[..cut.index(start.len() + 1)].to_vec();
                let end = keys::prefix_end(&prefix);
                (prefix, end)
            }
            2 => (start, Some(other)),
            _ => {
                let mut end = start.clone();
                end.push(0);
                (start, Some(end))
            }
        }
    })
}

fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    key >= start && end.is_none_or(|end| key < end)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Every key of the range routes to a shard in the answer.
    #[test]
    fn shards_for_range_never_misses_a_shard(
        which in 0..2usize,
        (start, end) in range(),
        pool in prop::collection::vec(key(), 0..24),
        suffixes in prop::collection::vec(key(), 0..24),
    ) {
        let t = topology([RICH, RICH_OTHER_PREFIX][which]);
        let answer = t.shards_for_range(&start, end.as_deref());
        prop_assert!(answer.windows(2).all(|w| w[0] < w[1]), "not sorted: {answer:?}");
        let mut candidates = pool;
        candidates.push(start.clone());
        for suffix in suffixes {
            let mut k = start.clone();
            k.extend_from_slice(&suffix);
            candidates.push(k);
        }
        for k in candidates {
            if in_range(&k, &start, end.as_deref()) {
                let shard = t.route(&k);
                prop_assert!(
                    answer.contains(&shard),
                    "key {:?} routes to {} outside {:?} for [{:?}, {:?})",
                    String::from_utf8_lossy(&k),
                    t.shard(shard).name,
                    names(&t, &answer),
                    String::from_utf8_lossy(&start),
                    end.as_deref().map(String::from_utf8_lossy),
                );
            }
        }
    }

    /// The range of one key is exactly that key's shard.
    #[test]
    fn single_key_range_is_the_route(which in 0..2usize, k in key()) {
        let t = topology([RICH, RICH_OTHER_PREFIX][which]);
        let mut end = k.clone();
        end.push(0);
        prop_assert_eq!(t.shards_for_range(&k, Some(&end)), vec![t.route(&k)]);
        prop_assert_eq!(t.shards_for_etcd_range(&k, b""), vec![t.route(&k)]);
    }

    /// Whatever the shape, the placement key is a prefix of the key (so a
    /// range inside one placement key is one shard).
    #[test]
    fn placement_key_is_a_prefix(k in key()) {
        for hash in [HashBy::Resource, HashBy::ResourceNamespace] {
            let p = keys::placement_key(b"/registry/", &k, hash);
            prop_assert!(k.starts_with(p));
            if let Some(fixed) = keys::fixed_placement(b"/registry/", &k, hash) {
                prop_assert_eq!(fixed, p);
            }
        }
    }
}

#[test]
fn placement_is_what_decides_where_keys_go() {
    let a = topology(
        r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite:///a/core.db"
max_connections = 4
[[shards]]
name = "pods"
endpoint = "postgres://u:p@db1:5432/pods"
[[routes]]
resource = "pods"
shard = "pods"
[[routes]]
resource = "events"
shards = ["core", "pods"]
hash = "resource-namespace"
"#,
    );
    assert_eq!(
        a.placement(),
        "registry_prefix \"/registry\"\nshard core\nshard pods\ndefault core\n\
         route resource \"pods\" group \"\" namespace * -> shard pods\n\
         route resource \"events\" group \"\" namespace * -> hashed by resource-namespace over core pods\n"
    );
    // Other servers, passwords and pool sizes place keys the same.
    let moved = topology(
        r#"default_shard = "core"
[[shards]]
name = "core"
endpoint = "sqlite:///b/core.db"
[[shards]]
name = "pods"
endpoint = "postgres://v:q@db2:5432/pods"
[[routes]]
resource = "pods"
shard = "pods"
[[routes]]
resource = "events"
shards = ["core", "pods"]
hash = "resource-namespace"
"#,
    );
    assert_eq!(moved.placement(), a.placement());
    // Another shard order gives other revision classes: another placement.
    let reordered = topology(
        r#"default_shard = "core"
[[shards]]
name = "pods"
endpoint = "postgres://u:p@db1:5432/pods"
[[shards]]
name = "core"
endpoint = "sqlite:///a/core.db"
[[routes]]
resource = "pods"
shard = "pods"
[[routes]]
resource = "events"
shards = ["core", "pods"]
hash = "resource-namespace"
"#,
    );
    assert_ne!(reordered.placement(), a.placement());
}

#[test]
fn every_one_shard_topology_places_keys_alike() {
    let file = topology(
        r#"default_shard = "core"
registry_prefix = "/other"
[[shards]]
name = "core"
endpoint = "sqlite:///a/core.db"
[[routes]]
prefix = "/x/"
shard = "core"
"#,
    );
    let Ok(endpoint) = Endpoint::parse("sqlite:///a/core.db") else {
        panic!("endpoint");
    };
    let single = Topology::single(endpoint);
    assert_eq!(file.placement(), single.placement());
}
