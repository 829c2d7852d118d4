//! The topology: which databases (shards) kubeshard serves, and which shard
//! each key goes to. Read from the TOML file given with `--config FILE`;
//! `--endpoint URL` alone is a one-shard topology ([`Topology::single`]).
//! `docs/topology.md` has the same description with longer examples.
//!
//! # File format
//!
//! ```toml
//! # Optional: kube-apiserver's --etcd-prefix (default "/registry").
//! registry_prefix = "/registry"
//! # Required: the shard of every key no route matches.
//! default_shard = "core"
//!
//! [[shards]]                # one table per database, at least one
//! name = "core"             # unique; letters, digits, '_' and '-'
//! endpoint = "sqlite:///var/lib/kubeshard/core.db"   # same forms as --endpoint
//! max_connections = 8       # optional: connection pool size for this shard
//!
//! [[shards]]
//! name = "pods"
//! endpoint = "postgres://postgres@127.0.0.1:5432/pods"
//!
//! [[routes]]                # checked top to bottom; the first match wins
//! prefix = "/registry/pods/"
//! shard = "pods"
//! ```
//!
//! Unknown fields are errors, so a misspelt field is reported instead of
//! being ignored. Two shards may not use the same database.
//!
//! ## Routes
//!
//! Every `[[routes]]` table has exactly one kind of matcher and one target.
//! Keys are checked against the routes in file order; the first route that
//! matches decides; keys no route matches go to `default_shard`.
//!
//! Matchers:
//!
//! - `prefix = "/registry/pods/"`: keys starting with these bytes. Mind the
//!   trailing `/`: `/registry/pods` would also match `/registry/podsecuritypolicy/...`.
//! - `resource = "pods"`, optionally with `group = "..."`: the objects of one
//!   resource, i.e. keys under `<registry_prefix>/<resource>/` for built-in
//!   resources and `<registry_prefix>/<group>/<resource>/` for custom
//!   resources. `group` defaults to the core group (`""`); the groups of
//!   kube-apiserver's built-in resources (`apps`, `batch`,
//!   `coordination.k8s.io`, `networking.k8s.io`, ...) are accepted but do not
//!   change the key, because kube-apiserver stores those resources without
//!   their group. A group containing a `.` that is not built-in is a custom
//!   resource group (`apiextensions.k8s.io` and `apiregistration.k8s.io`
//!   count as such, since their objects are stored under the group). A group
//!   with neither is refused. `resource` is the name in the key, which for a
//!   few built-ins differs from the API name: nodes are `minions`, ingresses
//!   `ingress`.
//! - `namespace = "kube-system"`, alone or with `resource` (and `group`):
//!   keys whose namespace segment is that namespace. The namespace segment is
//!   the segment after `<registry_prefix>/[<group>/]<resource>/` (after
//!   `services/specs/` or `services/endpoints/` for services) **when another
//!   `/` follows it**: `/registry/pods/kube-system/x` has namespace
//!   `kube-system`; `/registry/namespaces/kube-system` has none. The topology
//!   cannot know which resources are cluster-scoped, so a cluster-scoped key
//!   is recognised by having one segment fewer; the objects of
//!   cluster-scoped resources never match a namespace matcher.
//! - `regex = "^/registry/[^/]+\\.crossplane\\.io/"`: a regular expression
//!   (Rust `regex` syntax) searched in the whole key, as bytes; it matches if
//!   it matches anywhere, so anchor it with `^` (and `$`) as needed.
//!
//! Targets:
//!
//! - `shard = "pods"`: every matching key goes to that shard.
//! - `shards = ["events-a", "events-b", "events-c"]`, with `hash =
//!   "resource"` (the default) or `hash = "resource-namespace"`: the key goes
//!   to one of those shards, chosen by rendezvous hashing of its *placement
//!   key*:
//!   - `hash = "resource"`: `<registry_prefix>/[<group>/]<resource>/`, so each
//!     resource type lives whole on one shard;
//!   - `hash = "resource-namespace"`: that plus `[<sub-type>/]<namespace>/`
//!     when the key has a namespace segment (see above), so one large
//!     resource type is spread over the shards namespace by namespace, while
//!     each namespace of it stays on one shard; keys without a namespace
//!     segment are placed by the resource alone;
//!   - keys without a resource segment (outside the registry prefix, or with
//!     no `/` after the first segment) have the empty placement key: all of
//!     them land on the same shard of the route.
//!
//!   The score of shard `s` is `XXH3_64bits(s.name || 0x00 || placement key)`
//!   and the highest score wins, so placement depends only on the shard
//!   names and the key: never on the order of the list, the version of Rust,
//!   or the other routes. Adding a shard to the list moves only keys onto the
//!   new shard. Renaming a shard moves keys.
//!
//! # Range requests
//!
//! [`Topology::shards_for_range`] says which shards may hold keys of a range
//! (see its documentation for the algorithm).

mod keys;
mod parse;
mod placement;
mod regex_match;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::endpoint::Endpoint;

use keys::Coverage;

/// A shard of a [`Topology`]: the index of the shard in [`Topology::shards`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(usize);

impl ShardId {
    /// The index of the shard in [`Topology::shards`].
    pub fn index(self) -> usize {
        self.0
    }
}

/// A place in the topology file, for messages: `FILE:LINE:COLUMN` (1-based;
/// the column counts characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub source: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.source, self.line, self.column)
    }
}

/// One database.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: String,
    pub endpoint: Endpoint,
    /// Connection pool size asked for in the file; `None`: the server's default.
    pub max_connections: Option<u32>,
    /// Where the shard's `name` is written (None for [`Topology::single`]),
    /// so that start-up errors about this shard, e.g. an unreachable
    /// endpoint, can name the line.
    pub location: Option<Location>,
}

/// What a hashed route places keys by (`hash = ...` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashBy {
    /// `hash = "resource"`: `<registry_prefix>/[<group>/]<resource>/`.
    #[default]
    Resource,
    /// `hash = "resource-namespace"`: that plus `[<sub-type>/]<namespace>/`.
    ResourceNamespace,
}

/// A route's matcher, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Prefix(String),
    /// `group` is empty for the core group.
    Resource {
        group: String,
        resource: String,
        namespace: Option<String>,
    },
    Namespace(String),
    Regex(String),
}

/// Where a route sends the keys it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Shard(ShardId),
    /// Rendezvous hashing over these shards (never empty, no duplicates).
    Hashed {
        shards: Vec<ShardId>,
        hash: HashBy,
    },
}

/// The matcher in the form the router evaluates.
#[derive(Debug, Clone)]
enum Compiled {
    /// Keys starting with any of these (prefix and resource matchers).
    Prefixes(Vec<Vec<u8>>),
    Namespace(Vec<u8>),
    Regex(Box<regex_match::RegexMatcher>),
}

/// One `[[routes]]` table.
#[derive(Debug, Clone)]
pub struct Route {
    matcher: Matcher,
    target: Target,
    location: Option<Location>,
    compiled: Compiled,
}

impl Route {
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Where the route's table starts in the file.
    pub fn location(&self) -> Option<&Location> {
        self.location.as_ref()
    }

    fn matches(&self, base: &[u8], key: &[u8]) -> bool {
        match &self.compiled {
            Compiled::Prefixes(prefixes) => prefixes.iter().any(|p| key.starts_with(p)),
            Compiled::Namespace(namespace) => keys::has_namespace(base, namespace, key),
            Compiled::Regex(regex) => regex.is_match(key),
        }
    }

    /// How many keys under `prefix` the matcher matches.
    fn coverage(&self, base: &[u8], prefix: &[u8]) -> Coverage {
        match &self.compiled {
            Compiled::Prefixes(prefixes) => keys::prefixes_coverage(prefixes, prefix),
            Compiled::Namespace(namespace) => keys::namespace_coverage(base, namespace, prefix),
            Compiled::Regex(regex) => regex.coverage(prefix),
        }
    }
}

/// A diagnostic about the topology file: `FILE:LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a topology was refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Every problem found, in file order, one per line.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics.iter().map(Diagnostic::to_string).collect();
    lines.join("\n")
}

/// The validated topology: shards, routes and the default shard.
#[derive(Debug, Clone)]
pub struct Topology {
    registry_prefix: String,
    /// `registry_prefix` followed by one `/`.
    base: Vec<u8>,
    shards: Vec<Shard>,
    routes: Vec<Route>,
    default_shard: ShardId,
    source: Option<String>,
}

/// The name of the only shard of [`Topology::single`].
pub const SINGLE_SHARD_NAME: &str = "default";

/// kube-apiserver's default `--etcd-prefix`.
pub const DEFAULT_REGISTRY_PREFIX: &str = "/registry";

impl Topology {
    /// The topology of `--endpoint URL` alone: one shard named "default",
    /// no routes.
    pub fn single(endpoint: Endpoint) -> Self {
        Topology {
            registry_prefix: DEFAULT_REGISTRY_PREFIX.to_string(),
            base: keys::registry_base(DEFAULT_REGISTRY_PREFIX),
            shards: vec![Shard {
                name: SINGLE_SHARD_NAME.to_string(),
                endpoint,
                max_connections: None,
                location: None,
            }],
            routes: Vec::new(),
            default_shard: ShardId(0),
            source: None,
        }
    }

    /// Parses and validates a topology file's text; `source_name` (usually
    /// the file's path) prefixes the error messages.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self, TopologyError> {
        parse::parse(text, source_name).map_err(TopologyError::Invalid)
    }

    /// Reads, parses and validates a topology file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| TopologyError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The file the topology was read from (None for [`Topology::single`]).
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// What decides where every key goes, in a canonical text: the registry
    /// prefix, the shards' names in order (their order also gives each its
    /// class of revisions), the default shard and the routes. Not the
    /// endpoints (a database may move to another server) nor pool sizes.
    /// Two topologies with the same placement put every key on the same
    /// shard; the data of a cluster is arranged for one placement
    /// (`kubeshard reshard` changes it). Every one-shard topology has the
    /// same placement (`--endpoint URL` and a file naming that database).
    pub fn placement(&self) -> String {
        // One shard holds every key, whatever its name and routes.
        if self.shards.len() == 1 {
            return "one shard\n".to_string();
        }
        let name = |id: &ShardId| self.shards[id.index()].name.clone();
        let quoted = |s: &str| format!("{s:?}");
        let mut out = format!("registry_prefix {}\n", quoted(&self.registry_prefix));
        for shard in &self.shards {
            out.push_str(&format!("shard {}\n", shard.name));
        }
        out.push_str(&format!("default {}\n", name(&self.default_shard)));
        for route in &self.routes {
            let matcher = match &route.matcher {
                Matcher::Prefix(p) => format!("prefix {}", quoted(p)),
                Matcher::Resource {
                    group,
                    resource,
                    namespace,
                } => format!(
                    "resource {} group {} namespace {}",
                    quoted(resource),
                    quoted(group),
                    namespace.as_deref().map_or("*".to_string(), quoted)
                ),
                Matcher::Namespace(n) => format!("namespace {}", quoted(n)),
                Matcher::Regex(r) => format!("regex {}", quoted(r)),
            };
            let target = match &route.target {
                Target::Shard(id) => format!("shard {}", name(id)),
                Target::Hashed { shards, hash } => {
                    // Rendezvous hashing goes by the names, not their order.
                    let mut names: Vec<String> = shards.iter().map(name).collect();
                    names.sort();
                    format!(
                        "hashed by {} over {}",
                        match hash {
                            HashBy::Resource => "resource",
                            HashBy::ResourceNamespace => "resource-namespace",
                        },
                        names.join(" ")
                    )
                }
            };
            out.push_str(&format!("route {matcher} -> {target}\n"));
        }
        out
    }

    /// kube-apiserver's `--etcd-prefix` as configured (default "/registry").
    pub fn registry_prefix(&self) -> &str {
        &self.registry_prefix
    }

    /// All shards, in file order; [`ShardId::index`] indexes this.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The same topology with every shard's endpoint passed through `f`
    /// (command-line settings that apply to every database).
    pub fn map_endpoints(mut self, f: impl Fn(Endpoint) -> Endpoint) -> Self {
        for shard in &mut self.shards {
            shard.endpoint = f(shard.endpoint.clone());
        }
        self
    }

    /// Every shard id, in file order.
    pub fn shard_ids(&self) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.shards.len()).map(ShardId)
    }

    /// The shard of an id this topology handed out.
    ///
    /// # Panics
    ///
    /// When the id comes from another topology with more shards.
    pub fn shard(&self, id: ShardId) -> &Shard {
        &self.shards[id.0]
    }

    pub fn shard_by_name(&self, name: &str) -> Option<ShardId> {
        self.shards.iter().position(|s| s.name == name).map(ShardId)
    }

    /// The shard of keys no route matches.
    pub fn default_shard(&self) -> ShardId {
        self.default_shard
    }

    /// The routes, in the order they are checked.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route matching `key`, if any (for logs and debugging).
    pub fn matching_route(&self, key: &[u8]) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(&self.base, key))
    }

    /// The shard that holds `key`: the target of the first matching route,
    /// else the default shard.
    pub fn route(&self, key: &[u8]) -> ShardId {
        match self.matching_route(key) {
            Some(route) => self.target_shard(&route.target, key),
            None => self.default_shard,
        }
    }

    fn target_shard(&self, target: &Target, key: &[u8]) -> ShardId {
        match target {
            Target::Shard(shard) => *shard,
            Target::Hashed { shards, hash } => {
                self.place(shards, keys::placement_key(&self.base, key, *hash))
            }
        }
    }

    /// Rendezvous hashing of a placement key over `shards` (see the module
    /// documentation).
    fn place(&self, shards: &[ShardId], placement_key: &[u8]) -> ShardId {
        placement::rendezvous(
            shards.iter().map(|&id| (id, self.shard(id).name.as_str())),
            placement_key,
        )
        // Hashed targets are never empty (validated).
        .unwrap_or(self.default_shard)
    }

    /// Every shard that may hold a key in `[start, end)` (`end = None`: no
    /// upper bound), in shard order. Correct: a shard that holds a key of the
    /// range is never missing. Tight in the common Kubernetes cases.
    ///
    /// The algorithm:
    ///
    /// 1. An empty range (`end <= start`) has no shard. The range of one key,
    ///    `[k, k\0)`, has exactly [`Topology::route`]`(k)`.
    /// 2. Find the longest prefix `p` of `start` such that every key in the
    ///    range starts with `p`: the longest `p` whose prefix end (the least
    ///    string greater than all strings starting with `p`) is not below
    ///    `end`. A range over `/registry/pods/` (end `/registry/pods0`) and a
    ///    paginated list continuing from `/registry/pods/ns/web-5\0` both
    ///    give `p = /registry/pods/`; `[k, ∞)` gives the empty prefix.
    /// 3. Answer for all keys starting with `p` ([`Topology::shards_for_prefix`]),
    ///    a superset of the range.
    pub fn shards_for_range(&self, start: &[u8], end: Option<&[u8]>) -> Vec<ShardId> {
        if let Some(end) = end {
            if end <= start {
                return Vec::new();
            }
            if end.len() == start.len() + 1 && end.starts_with(start) && end.last() == Some(&0) {
                return vec![self.route(start)];
            }
        }
        self.shards_for_prefix(keys::covering_prefix(start, end))
    }

    /// [`Topology::shards_for_range`] with etcd's encoding of the range end:
    /// empty for the single key `key`, `"\0"` for every key `>= key`, else
    /// the exclusive end.
    pub fn shards_for_etcd_range(&self, key: &[u8], range_end: &[u8]) -> Vec<ShardId> {
        match range_end {
            [] => vec![self.route(key)],
            [0] => self.shards_for_range(key, None),
            end => self.shards_for_range(key, Some(end)),
        }
    }

    /// Every shard that may hold a key starting with `prefix`, in shard
    /// order (a watch or list of a prefix).
    ///
    /// The routes are walked in order. Each matcher is classified against
    /// the set of keys starting with `prefix`: it matches **none** of them
    /// (skipped), **some** (its targets are added and the walk goes on,
    /// since the other keys fall through), or **all** (its targets are added
    /// and the walk stops: no key reaches later routes). If no route matches
    /// all, the default shard is added. Classification:
    ///
    /// - prefix and resource matchers are unions of key prefixes `q`: all if
    ///   some `q` is a prefix of `prefix`, some if some `q` extends `prefix`,
    ///   else none;
    /// - a namespace matcher: all or none when `prefix` already contains the
    ///   whole namespace segment (with its `/`), none when the namespace
    ///   cannot start with the partial segment at the end of `prefix` or
    ///   `prefix` leaves the registry, else some;
    /// - a regex matcher: none if no key under `prefix` can match (its DFA
    ///   dies on `prefix`), all if a match ends within `prefix` or every
    ///   key under it matches at its end, else some (also when the pattern
    ///   was too large or complex to analyse; see `regex_match`).
    ///
    /// The targets of a hashed route are the shards of the placement keys
    /// its matching keys under `prefix` can have: for each of the route's
    /// prefixes `q` overlapping `prefix` (or `prefix` itself, for the other
    /// matchers) take the longer of the two, `m`; if every key starting with
    /// `m` has the same placement key (`m` contains the resource segment,
    /// plus the namespace segment for `resource-namespace`), that key's
    /// shard, else every shard of the route. So `/registry/pods/ns1/` gives
    /// one shard with `resource-namespace` hashing, and `/registry/events/`
    /// gives all shards of an events route hashed by namespace.
    pub fn shards_for_prefix(&self, prefix: &[u8]) -> Vec<ShardId> {
        let mut hit = vec![false; self.shards.len()];
        let mut stopped = false;
        for route in &self.routes {
            let coverage = route.coverage(&self.base, prefix);
            if coverage == Coverage::None {
                continue;
            }
            self.add_targets(route, prefix, &mut hit);
            if coverage == Coverage::All {
                stopped = true;
                break;
            }
        }
        if !stopped {
            hit[self.default_shard.0] = true;
        }
        hit.iter()
            .enumerate()
            .filter(|&(_, &h)| h)
            .map(|(i, _)| ShardId(i))
            .collect()
    }

    /// Marks the shards `route` may send keys under `prefix` to.
    fn add_targets(&self, route: &Route, prefix: &[u8], hit: &mut [bool]) {
        let (shards, hash) = match &route.target {
            Target::Shard(shard) => {
                hit[shard.0] = true;
                return;
            }
            Target::Hashed { shards, hash } => (shards, *hash),
        };
        let regions: Vec<&[u8]> = match &route.compiled {
            Compiled::Prefixes(prefixes) => prefixes
                .iter()
                .filter_map(|q| {
                    if prefix.starts_with(q) {
                        Some(prefix)
                    } else if q.starts_with(prefix) {
                        Some(q.as_slice())
                    } else {
                        None
                    }
                })
                .collect(),
            Compiled::Namespace(_) | Compiled::Regex(_) => vec![prefix],
        };
        for region in regions {
            match keys::fixed_placement(&self.base, region, hash) {
                Some(placement_key) => hit[self.place(shards, placement_key).0] = true,
                None => {
                    for shard in shards {
                        hit[shard.0] = true;
                    }
                    return;
                }
            }
        }
    }
}
