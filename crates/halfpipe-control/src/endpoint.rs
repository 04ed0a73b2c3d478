//! The admin API's endpoint table: every endpoint, its method and path, the one capability it
//! needs, and the router from a request line to an endpoint.
//!
//! | endpoint | request | capability |
//! | --- | --- | --- |
//! | [`Endpoint::Status`] | `GET /v1/status` | `status` |
//! | [`Endpoint::SessionsList`] | `GET /v1/sessions` | `sessions.read` |
//! | [`Endpoint::SessionsKill`] | `POST /v1/sessions/{id}/kill` | `sessions.kill` |
//! | [`Endpoint::ModeGet`] | `GET /v1/mode` | `status` |
//! | [`Endpoint::ModeSet`] | `POST /v1/mode` | `mode.set` |
//! | [`Endpoint::ModeUnfreeze`] | `POST /v1/mode/unfreeze` | `mode.set` |
//! | [`Endpoint::TokensCreate`] | `POST /v1/tokens` | `tokens.manage` |
//! | [`Endpoint::TokensList`] | `GET /v1/tokens` | `tokens.manage` |
//! | [`Endpoint::TokensRevoke`] | `DELETE /v1/tokens/{id}` | `tokens.manage` |
//! | [`Endpoint::UsersList`] | `GET /v1/users` | `users.manage` |
//! | [`Endpoint::UsersAdd`] | `POST /v1/users` | `users.manage` |
//! | [`Endpoint::UsersRemove`] | `DELETE /v1/users/{name}` | `users.manage` |
//! | [`Endpoint::UsersDisable`] | `POST /v1/users/{name}/disable` | `users.manage` |
//! | [`Endpoint::UsersEnable`] | `POST /v1/users/{name}/enable` | `users.manage` |
//! | [`Endpoint::LogVerify`] | `POST /v1/log/verify` | `log.verify` |
//! | [`Endpoint::LogTail`] | `GET /v1/log/tail` | `log.read` |
//! | [`Endpoint::Reload`] | `POST /v1/reload` | `reload` |
//! | [`Endpoint::UsersPolicy`] | `POST /v1/users/{name}/policy` | `users.manage` |
//! | [`Endpoint::KeysList`] | `GET /v1/keys` | `keys.manage` |
//! | [`Endpoint::KeysRotate`] | `POST /v1/keys/rotate` | `keys.manage` |
//!
//! `admin` allows every endpoint. Path parameters are validated by [`route`]: `{id}` is 1 to
//! 64 hex digits (returned in lower case), `{name}` 1 to 64 of `A-Z a-z 0-9 . _ -` (and not
//! `.` or `..`).

use std::fmt;

use crate::capability::{Capability, CapabilitySet};
use crate::mode::truncate;

/// The longest `{id}` or `{name}` path parameter.
pub const MAX_PARAM_LEN: usize = 64;

/// How much of a refused path an error echoes.
const ECHO_LEN: usize = 128;

/// One endpoint of the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// `GET /v1/status`: mode, tripwires, counters.
    Status,
    /// `GET /v1/sessions`: live sessions.
    SessionsList,
    /// `POST /v1/sessions/{id}/kill`: close a session.
    SessionsKill,
    /// `GET /v1/mode`: the mode state.
    ModeGet,
    /// `POST /v1/mode`: change the mode.
    ModeSet,
    /// `POST /v1/mode/unfreeze`: clear the de-escalation freeze.
    ModeUnfreeze,
    /// `POST /v1/tokens`: create a token.
    TokensCreate,
    /// `GET /v1/tokens`: list tokens (never their secrets).
    TokensList,
    /// `DELETE /v1/tokens/{id}`: revoke a token.
    TokensRevoke,
    /// `GET /v1/users`: list users.
    UsersList,
    /// `POST /v1/users`: add a user.
    UsersAdd,
    /// `DELETE /v1/users/{name}`: remove a user.
    UsersRemove,
    /// `POST /v1/users/{name}/disable`: disable a user.
    UsersDisable,
    /// `POST /v1/users/{name}/enable`: enable a user.
    UsersEnable,
    /// `POST /v1/log/verify`: verify the audit log.
    LogVerify,
    /// `GET /v1/log/tail`: the last audit records (`?n=`).
    LogTail,
    /// `POST /v1/reload`: re-read the configuration.
    Reload,
    /// `POST /v1/users/{name}/policy`: set a user's limits (expiry, devices, speed, quota,
    /// destinations).
    UsersPolicy,
    /// `GET /v1/keys`: the key store's keys (ids, kinds, states, public halves; never a
    /// secret).
    KeysList,
    /// `POST /v1/keys/rotate`: a new server static key, the old one accepted for an overlap
    /// window.
    KeysRotate,
}

impl Endpoint {
    /// Every endpoint, in a fixed order.
    pub const ALL: [Endpoint; 20] = [
        Endpoint::Status,
        Endpoint::SessionsList,
        Endpoint::SessionsKill,
        Endpoint::ModeGet,
        Endpoint::ModeSet,
        Endpoint::ModeUnfreeze,
        Endpoint::TokensCreate,
        Endpoint::TokensList,
        Endpoint::TokensRevoke,
        Endpoint::UsersList,
        Endpoint::UsersAdd,
        Endpoint::UsersRemove,
        Endpoint::UsersDisable,
        Endpoint::UsersEnable,
        Endpoint::LogVerify,
        Endpoint::LogTail,
        Endpoint::Reload,
        Endpoint::UsersPolicy,
        Endpoint::KeysList,
        Endpoint::KeysRotate,
    ];

    /// The one capability the endpoint needs (`admin` also allows it).
    ///
    /// One exhaustive `match` without a wildcard: an endpoint added without a capability does
    /// not compile.
    pub fn capability(self) -> Capability {
        match self {
            Endpoint::Status => Capability::Status,
            Endpoint::SessionsList => Capability::SessionsRead,
            Endpoint::SessionsKill => Capability::SessionsKill,
            Endpoint::ModeGet => Capability::Status,
            Endpoint::ModeSet => Capability::ModeSet,
            Endpoint::ModeUnfreeze => Capability::ModeSet,
            Endpoint::TokensCreate => Capability::TokensManage,
            Endpoint::TokensList => Capability::TokensManage,
            Endpoint::TokensRevoke => Capability::TokensManage,
            Endpoint::UsersList => Capability::UsersManage,
            Endpoint::UsersAdd => Capability::UsersManage,
            Endpoint::UsersRemove => Capability::UsersManage,
            Endpoint::UsersDisable => Capability::UsersManage,
            Endpoint::UsersEnable => Capability::UsersManage,
            Endpoint::LogVerify => Capability::LogVerify,
            Endpoint::LogTail => Capability::LogRead,
            Endpoint::Reload => Capability::Reload,
            Endpoint::UsersPolicy => Capability::UsersManage,
            Endpoint::KeysList => Capability::KeysManage,
            Endpoint::KeysRotate => Capability::KeysManage,
        }
    }

    /// The HTTP method: `GET`, `POST` or `DELETE`.
    pub fn method(self) -> &'static str {
        match self {
            Endpoint::Status
            | Endpoint::SessionsList
            | Endpoint::ModeGet
            | Endpoint::TokensList
            | Endpoint::UsersList
            | Endpoint::LogTail
            | Endpoint::KeysList => "GET",
            Endpoint::SessionsKill
            | Endpoint::ModeSet
            | Endpoint::ModeUnfreeze
            | Endpoint::TokensCreate
            | Endpoint::UsersAdd
            | Endpoint::UsersDisable
            | Endpoint::UsersEnable
            | Endpoint::LogVerify
            | Endpoint::Reload
            | Endpoint::UsersPolicy
            | Endpoint::KeysRotate => "POST",
            Endpoint::TokensRevoke | Endpoint::UsersRemove => "DELETE",
        }
    }

    /// The path, with its parameter (if any) as `{id}` or `{name}`.
    pub fn path_pattern(self) -> &'static str {
        match self {
            Endpoint::Status => "/v1/status",
            Endpoint::SessionsList => "/v1/sessions",
            Endpoint::SessionsKill => "/v1/sessions/{id}/kill",
            Endpoint::ModeGet | Endpoint::ModeSet => "/v1/mode",
            Endpoint::ModeUnfreeze => "/v1/mode/unfreeze",
            Endpoint::TokensCreate | Endpoint::TokensList => "/v1/tokens",
            Endpoint::TokensRevoke => "/v1/tokens/{id}",
            Endpoint::UsersList | Endpoint::UsersAdd => "/v1/users",
            Endpoint::UsersRemove => "/v1/users/{name}",
            Endpoint::UsersDisable => "/v1/users/{name}/disable",
            Endpoint::UsersEnable => "/v1/users/{name}/enable",
            Endpoint::LogVerify => "/v1/log/verify",
            Endpoint::LogTail => "/v1/log/tail",
            Endpoint::Reload => "/v1/reload",
            Endpoint::UsersPolicy => "/v1/users/{name}/policy",
            Endpoint::KeysList => "/v1/keys",
            Endpoint::KeysRotate => "/v1/keys/rotate",
        }
    }

    /// A stable name for logs and the audit trail, e.g. `sessions.kill`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::SessionsList => "sessions.list",
            Endpoint::SessionsKill => "sessions.kill",
            Endpoint::ModeGet => "mode.get",
            Endpoint::ModeSet => "mode.set",
            Endpoint::ModeUnfreeze => "mode.unfreeze",
            Endpoint::TokensCreate => "tokens.create",
            Endpoint::TokensList => "tokens.list",
            Endpoint::TokensRevoke => "tokens.revoke",
            Endpoint::UsersList => "users.list",
            Endpoint::UsersAdd => "users.add",
            Endpoint::UsersRemove => "users.remove",
            Endpoint::UsersDisable => "users.disable",
            Endpoint::UsersEnable => "users.enable",
            Endpoint::LogVerify => "log.verify",
            Endpoint::LogTail => "log.tail",
            Endpoint::Reload => "reload",
            Endpoint::UsersPolicy => "users.policy",
            Endpoint::KeysList => "keys.list",
            Endpoint::KeysRotate => "keys.rotate",
        }
    }
}

impl fmt::Display for Endpoint {
    /// `METHOD /path/pattern`, e.g. `POST /v1/sessions/{id}/kill`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path_pattern())
    }
}

/// A request line resolved to an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The validated `{id}` (lower case) or `{name}` parameter, for endpoints that have one.
    pub param: Option<String>,
    /// What followed `?` in the path, without the `?`; `None` when absent or empty.
    pub query: Option<String>,
}

/// Which path parameter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `{id}`: 1 to 64 hex digits.
    Id,
    /// `{name}`: 1 to 64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
    Name,
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamKind::Id => "id",
            ParamKind::Name => "user name",
        })
    }
}

/// A request line that does not resolve to an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No endpoint has this path (HTTP 404).
    #[error("no admin endpoint at {path:?}")]
    NotFound {
        /// The path (at most 128 bytes of it), without the query.
        path: String,
    },
    /// Endpoints have this path, but not with this method (HTTP 405).
    #[error("{method:?} is not allowed on {pattern} (allowed: {})", allowed.join(", "))]
    MethodNotAllowed {
        /// The method given (at most 128 bytes of it).
        method: String,
        /// The path pattern matched.
        pattern: &'static str,
        /// The methods that are allowed there.
        allowed: Vec<&'static str>,
    },
    /// The path parameter is malformed (HTTP 400).
    #[error("invalid {kind} {value:?} in {pattern}: {why}")]
    InvalidParam {
        /// Which parameter.
        kind: ParamKind,
        /// The value given (at most 128 bytes of it).
        value: String,
        /// The path pattern matched.
        pattern: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// An endpoint refused to a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the token lacks the {needed} capability needed for {endpoint}")]
pub struct Denied {
    /// The endpoint asked for.
    pub endpoint: Endpoint,
    /// The capability it needs.
    pub needed: Capability,
}

/// Whether `caps` may call `endpoint`: exactly when it holds the endpoint's capability or
/// `admin`.
pub fn authorize(endpoint: Endpoint, caps: &CapabilitySet) -> Result<(), Denied> {
    let needed = endpoint.capability();
    if caps.allows(needed) {
        Ok(())
    } else {
        Err(Denied { endpoint, needed })
    }
}

fn check_param(kind: ParamKind, value: &str) -> Result<String, &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > MAX_PARAM_LEN {
        return Err("longer than 64 characters");
    }
    match kind {
        ParamKind::Id => {
            if !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("only hex digits (0-9, a-f) are allowed");
            }
            Ok(value.to_ascii_lowercase())
        }
        ParamKind::Name => {
            if !value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
            }
            if value == "." || value == ".." {
                return Err("\".\" and \"..\" are not names");
            }
            Ok(value.to_string())
        }
    }
}

/// Whether `path` has the shape of `pattern`; if so, the raw parameter (if any) and its kind.
fn match_pattern<'p>(pattern: &str, path: &'p str) -> Option<Option<(ParamKind, &'p str)>> {
    let mut param = None;
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(param),
            (Some(w), Some(g)) => match w {
                "{id}" => param = Some((ParamKind::Id, g)),
                "{name}" => param = Some((ParamKind::Name, g)),
                _ if w == g => {}
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// Resolves a request's method and path (with an optional `?query`, given back separately) to
/// an endpoint. Paths match exactly (no trailing slash, no percent-decoding); methods are
/// case-sensitive. Never panics.
pub fn route(method: &str, path: &str) -> Result<Route, RouteError> {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, (!q.is_empty()).then(|| q.to_string())),
        None => (path, None),
    };
    let mut shape: Option<(&'static str, Vec<&'static str>)> = None;
    for endpoint in Endpoint::ALL {
        let pattern = endpoint.path_pattern();
        let Some(param) = match_pattern(pattern, path) else {
            continue;
        };
        if endpoint.method() != method {
            match &mut shape {
                Some((_, allowed)) => allowed.push(endpoint.method()),
                None => shape = Some((pattern, vec![endpoint.method()])),
            }
            continue;
        }
        let param = match param {
            None => None,
            Some((kind, raw)) => {
                Some(
                    check_param(kind, raw).map_err(|why| RouteError::InvalidParam {
                        kind,
                        value: truncate(raw, ECHO_LEN).to_string(),
                        pattern,
                        why,
                    })?,
                )
            }
        };
        return Ok(Route {
            endpoint,
            param,
            query,
        });
    }
    match shape {
        Some((pattern, allowed)) => Err(RouteError::MethodNotAllowed {
            method: truncate(method, ECHO_LEN).to_string(),
            pattern,
            allowed,
        }),
        None => Err(RouteError::NotFound {
            path: truncate(path, ECHO_LEN).to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn example_path(e: Endpoint) -> String {
        e.path_pattern()
            .replace("{id}", "00ff1a")
            .replace("{name}", "alice.b-c_d")
    }

    #[test]
    fn authorize_is_exactly_the_table() {
        let mut sets: Vec<(Option<Capability>, CapabilitySet)> =
            vec![(None, CapabilitySet::default())];
        for c in Capability::ALL {
            sets.push((Some(c), CapabilitySet::new([c])));
        }
        for e in Endpoint::ALL {
            for (single, caps) in &sets {
                let expect =
                    matches!(single, Some(c) if *c == e.capability() || *c == Capability::Admin);
                let got = authorize(e, caps);
                assert_eq!(got.is_ok(), expect, "{e} with {caps:?}");
                if let Err(d) = got {
                    assert_eq!(
                        d,
                        Denied {
                            endpoint: e,
                            needed: e.capability()
                        }
                    );
                    assert!(d.to_string().contains(e.capability().name()));
                }
            }
        }
    }

    #[test]
    fn capabilities_are_as_specified() {
        use Capability as C;
        use Endpoint as E;
        let table = [
            (E::Status, C::Status, "GET /v1/status"),
            (E::SessionsList, C::SessionsRead, "GET /v1/sessions"),
            (
                E::SessionsKill,
                C::SessionsKill,
                "POST /v1/sessions/{id}/kill",
            ),
            (E::ModeGet, C::Status, "GET /v1/mode"),
            (E::ModeSet, C::ModeSet, "POST /v1/mode"),
            (E::ModeUnfreeze, C::ModeSet, "POST /v1/mode/unfreeze"),
            (E::TokensCreate, C::TokensManage, "POST /v1/tokens"),
            (E::TokensList, C::TokensManage, "GET /v1/tokens"),
            (E::TokensRevoke, C::TokensManage, "DELETE /v1/tokens/{id}"),
            (E::UsersList, C::UsersManage, "GET /v1/users"),
            (E::UsersAdd, C::UsersManage, "POST /v1/users"),
            (E::UsersRemove, C::UsersManage, "DELETE /v1/users/{name}"),
            (
                E::UsersDisable,
                C::UsersManage,
                "POST /v1/users/{name}/disable",
            ),
            (
                E::UsersEnable,
                C::UsersManage,
                "POST /v1/users/{name}/enable",
            ),
            (E::LogVerify, C::LogVerify, "POST /v1/log/verify"),
            (E::LogTail, C::LogRead, "GET /v1/log/tail"),
            (E::Reload, C::Reload, "POST /v1/reload"),
            (
                E::UsersPolicy,
                C::UsersManage,
                "POST /v1/users/{name}/policy",
            ),
            (E::KeysList, C::KeysManage, "GET /v1/keys"),
            (E::KeysRotate, C::KeysManage, "POST /v1/keys/rotate"),
        ];
        assert_eq!(table.len(), Endpoint::ALL.len());
        for ((e, c, line), listed) in table.into_iter().zip(Endpoint::ALL) {
            assert_eq!(e, listed);
            assert_eq!(e.capability(), c);
            assert_eq!(e.to_string(), line);
        }
        // Every capability but admin guards some endpoint; admin guards none by itself.
        for c in Capability::ALL {
            let used = Endpoint::ALL.iter().any(|e| e.capability() == c);
            assert_eq!(used, c != Capability::Admin, "{c}");
        }
        // Method + pattern and names are unique.
        let mut lines: Vec<_> = Endpoint::ALL.iter().map(|e| e.to_string()).collect();
        lines.sort();
        lines.dedup();
        assert_eq!(lines.len(), Endpoint::ALL.len());
        let mut names: Vec<_> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Endpoint::ALL.len());
    }

    #[test]
    fn every_pattern_routes_back_to_its_endpoint() {
        for e in Endpoint::ALL {
            let r = route(e.method(), &example_path(e)).unwrap();
            assert_eq!(r.endpoint, e);
            assert_eq!(r.query, None);
            if e.path_pattern().contains("{id}") {
                assert_eq!(r.param.as_deref(), Some("00ff1a"));
            } else if e.path_pattern().contains("{name}") {
                assert_eq!(r.param.as_deref(), Some("alice.b-c_d"));
            } else {
                assert_eq!(r.param, None);
            }
        }
    }

    #[test]
    fn query_is_stripped_and_given_back() {
        let r = route("GET", "/v1/log/tail?n=20").unwrap();
        assert_eq!(r.endpoint, Endpoint::LogTail);
        assert_eq!(r.query.as_deref(), Some("n=20"));
        assert_eq!(route("GET", "/v1/log/tail?").unwrap().query, None);
        let r = route("DELETE", "/v1/tokens/AB12?force=1&x=?").unwrap();
        assert_eq!(r.param.as_deref(), Some("ab12"));
        assert_eq!(r.query.as_deref(), Some("force=1&x=?"));
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        for p in [
            "",
            "/",
            "/v1",
            "/v1/",
            "/v1/status/",
            "/v2/status",
            "v1/status",
            "//v1/status",
            "/v1/sessions/ab/kill/now",
            "/v1/users/alice/delete",
            "/V1/STATUS",
        ] {
            assert!(
                matches!(route("GET", p), Err(RouteError::NotFound { .. })),
                "{p:?}"
            );
        }
        let e = route("DELETE", "/v1/status").unwrap_err();
        assert_eq!(
            e,
            RouteError::MethodNotAllowed {
                method: "DELETE".to_string(),
                pattern: "/v1/status",
                allowed: vec!["GET"],
            }
        );
        assert!(e.to_string().contains("allowed: GET"));
        match route("PUT", "/v1/mode").unwrap_err() {
            RouteError::MethodNotAllowed { allowed, .. } => assert_eq!(allowed, ["GET", "POST"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            route("get", "/v1/status"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
        // The wrong method on a parameterised path is 405 whatever the parameter.
        assert!(matches!(
            route("GET", "/v1/tokens/not-hex"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
    }

    #[test]
    fn path_params_are_validated() {
        let id_ok = ["a", "0123456789abcdefABCDEF", &"f".repeat(64)];
        for id in id_ok {
            let r = route("POST", &format!("/v1/sessions/{id}/kill")).unwrap();
            assert_eq!(r.param.unwrap(), id.to_ascii_lowercase());
        }
        for id in ["", "g", "12 3", "ab-cd", "%41", &"f".repeat(65), "é"] {
            let e = route("DELETE", &format!("/v1/tokens/{id}")).unwrap_err();
            assert!(
                matches!(
                    e,
                    RouteError::InvalidParam {
                        kind: ParamKind::Id,
                        ..
                    }
                ),
                "{id:?}: {e:?}"
            );
        }
        for name in ["alice", "A.b_c-9", "...", &"n".repeat(64)] {
            let r = route("POST", &format!("/v1/users/{name}/disable")).unwrap();
            assert_eq!(r.param.as_deref(), Some(name));
        }
        for name in [
            "",
            ".",
            "..",
            "al ice",
            "al%20ice",
            "ali\0ce",
            "al/ice",
            &"n".repeat(65),
            "bob@x",
        ] {
            let e = route("DELETE", &format!("/v1/users/{name}"));
            assert!(
                matches!(
                    e,
                    Err(RouteError::InvalidParam {
                        kind: ParamKind::Name,
                        ..
                    }) | Err(RouteError::NotFound { .. })
                ),
                "{name:?}: {e:?}"
            );
            assert!(e.is_err(), "{name:?}");
        }
        let e = route("POST", "/v1/users/bob@x/enable").unwrap_err();
        assert!(e.to_string().contains("invalid user name \"bob@x\""), "{e}");
        let long = "x".repeat(10_000);
        match route("DELETE", &format!("/v1/users/{long}")).unwrap_err() {
            RouteError::InvalidParam { value, .. } => assert!(value.len() <= 128),
            other => panic!("{other:?}"),
        }
        match route("GET", &format!("/{long}")).unwrap_err() {
            RouteError::NotFound { path } => assert!(path.len() <= 128),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn route_never_panics(method in any::<String>(), path in any::<String>()) {
            let _ = route(&method, &path);
        }

        #[test]
        fn route_never_panics_near_real_paths(
            e in proptest::sample::select(Endpoint::ALL.to_vec()),
            method in proptest::sample::select(vec!["GET", "POST", "DELETE", "PUT", ""]),
            junk in "[a-zA-Z0-9/?{}%.\\-_é\u{0}]{0,80}",
        ) {
            let p = e.path_pattern().replace("{id}", &junk).replace("{name}", &junk);
            let _ = route(method, &p);
            let _ = route(method, &format!("{}{junk}", e.path_pattern()));
            if let Ok(r) = route(method, &p) {
                prop_assert_eq!(r.endpoint.method(), method);
            }
        }
    }
}
