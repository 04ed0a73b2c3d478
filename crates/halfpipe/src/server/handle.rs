//! What the admin API and `ctl` see of a running exit: status, sessions, users, the audit
//! log, and reloading the configuration.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::{close_sessions, lock, read, Reloadable, ServerHandle, State};
use crate::control::metrics::Gauges;
use crate::control::{wall_ms, ControlPlane};
use crate::keyfile::{decode_public, encode_key};
use crate::leg_url::Scheme;

/// Recomputes the user table: the config's users and the admin API's, minus disabled ones.
pub(super) fn rebuild_users(state: &State) {
    let reloadable = read(&state.reloadable);
    let users = state.control.db().users();
    let runtime = users.list();
    let disabled: BTreeSet<String> = users.disabled_names();
    let mut table = HashMap::new();
    for u in &reloadable.config_users {
        if !disabled.contains(&u.name) {
            table.insert(u.public_key, u.name.clone());
        }
    }
    for u in runtime.iter().filter(|u| !u.disabled) {
        table.entry(u.public_key).or_insert_with(|| u.name.clone());
    }
    *state.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
}

impl ServerHandle {
    /// The control plane.
    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.state.control
    }

    /// The Prometheus page.
    pub fn metrics_page(&self) -> String {
        let cp = &self.state.control;
        let mut page = cp.metrics.render(&self.gauges());
        page.push_str(&self.user_metrics());
        page
    }

    /// Per-user transfer (this UTC month) and quota, in Prometheus text.
    fn user_metrics(&self) -> String {
        use std::fmt::Write as _;
        let db = self.state.control.db();
        let now = wall_ms();
        let mut names: BTreeSet<String> = read(&self.state.reloadable)
            .config_users
            .iter()
            .map(|u| u.name.clone())
            .collect();
        names.extend(db.users().list().into_iter().map(|u| u.name));
        let label = |n: &str| {
            n.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let mut out = String::from(
            "# HELP halfpipe_user_transfer_bytes Bytes a user moved this UTC month (both directions).\n\
             # TYPE halfpipe_user_transfer_bytes gauge\n\
             # HELP halfpipe_user_quota_used_bytes Bytes counted against a user's quota this period.\n\
             # TYPE halfpipe_user_quota_used_bytes gauge\n\
             # HELP halfpipe_user_quota_bytes A user's transfer quota per period.\n\
             # TYPE halfpipe_user_quota_bytes gauge\n",
        );
        for n in &names {
            let l = label(n);
            let month = db.quotas().used(n, now, halfpipe_state::QuotaPeriod::Month);
            let _ = writeln!(out, "halfpipe_user_transfer_bytes{{user=\"{l}\"}} {month}");
            if let Some(q) = db.users().policy(n).quota {
                let u = db.quotas().usage(n, now, Some(q));
                let p = q.period.as_str();
                let _ = writeln!(
                    out,
                    "halfpipe_user_quota_used_bytes{{user=\"{l}\",period=\"{p}\"}} {}",
                    u.used
                );
                let _ = writeln!(
                    out,
                    "halfpipe_user_quota_bytes{{user=\"{l}\",period=\"{p}\"}} {}",
                    q.bytes
                );
            }
        }
        out
    }

    fn gauges(&self) -> Gauges {
        let sessions = lock(&self.state.sessions);
        Gauges {
            sessions: sessions.len(),
            streams: sessions.values().map(|e| e.tunnel.stream_count()).sum(),
            mode: self.state.control.mode() as u8,
            uptime_s: self.state.control.uptime().as_secs(),
        }
    }

    /// Mode, uptime, sessions, users, legs per transport, bytes, tripwires, counters.
    pub fn status(&self) -> Value {
        let cp = &self.state.control;
        let g = self.gauges();
        let mut legs: HashMap<&'static str, usize> = HashMap::new();
        for e in lock(&self.state.sessions).values() {
            let (send, recv) = e.tunnel.legs_attached();
            // At the exit the receive leg is the uplink, the send leg the downlink.
            for (attached, scheme) in [(recv, e.transports[0]), (send, e.transports[1])] {
                if let (true, Some(s)) = (attached, scheme) {
                    *legs.entry(s.name()).or_default() += 1;
                }
            }
        }
        let bytes: Vec<Value> = Scheme::ALL
            .iter()
            .map(|s| {
                let b = cp.metrics.leg_bytes(*s);
                json!({
                    "transport": s.name(),
                    "up": b.up.load(Ordering::Relaxed),
                    "down": b.down.load(Ordering::Relaxed),
                })
            })
            .collect();
        let tripwires: Vec<Value> = cp
            .tripwire_status()
            .into_iter()
            .map(|t| {
                json!({
                    "kind": t.kind.name(),
                    "key": t.key,
                    "fires": t.fires,
                    "in_episode": t.in_episode,
                    "last_fired_ms": t.last_fired_ms,
                    "count_in_window": t.count_in_window,
                })
            })
            .collect();
        let mode = cp.mode_state();
        let bans: Vec<Value> = cp
            .db()
            .bans()
            .list(cp.db().clock().now_ms())
            .into_iter()
            .map(|(key, b)| json!({ "key": key, "until_service_ms": b.until_ms, "reason": b.reason }))
            .collect();
        json!({
            "bans": bans,
            "mode": mode.mode.name(),
            "frozen": mode.frozen,
            "mode_changed_by": mode.changed_by,
            "mode_reason": mode.reason,
            "uptime_s": g.uptime_s,
            "sessions": g.sessions,
            "streams": g.streams,
            "users": read(&self.state.users).len(),
            "legs": legs,
            "bytes": bytes,
            "sessions_opened": cp.metrics.sessions_opened.load(Ordering::Relaxed),
            "handshake_failures": cp.metrics.handshake_failures(),
            "limit_hits": cp.metrics.limit_hits(),
            "tripwires": tripwires,
            "audit_failure": cp.audit_failure(),
            "audit_forward_dropped": cp.forward_dropped(),
        })
    }

    /// The live sessions, for `ctl sessions`.
    pub fn sessions_info(&self) -> Vec<Value> {
        lock(&self.state.sessions)
            .iter()
            .map(|(id, e)| {
                json!({
                    "id": id.to_string(),
                    "user": e.user,
                    "peer": e.peer.to_string(),
                    "age_s": e.opened.elapsed().as_secs(),
                    "streams": e.tunnel.stream_count(),
                    "bytes_up": e.tunnel.stats.bytes_received.load(Ordering::Relaxed),
                    "bytes_down": e.tunnel.stats.bytes_sent.load(Ordering::Relaxed),
                    "uplink": e.transports[0].map(Scheme::name),
                    "downlink": e.transports[1].map(Scheme::name),
                })
            })
            .collect()
    }

    /// Closes one session, named by its id (hex) or a unique prefix of it.
    pub fn kill_session(&self, id: &str) -> Result<(), String> {
        let sessions = lock(&self.state.sessions);
        let matches: Vec<_> = sessions
            .iter()
            .filter(|(sid, _)| sid.to_string().starts_with(id))
            .collect();
        let (sid, entry) = match matches.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "no session {id} (see 'halfpipe ctl sessions list')"
                ))
            }
            _ => {
                return Err(format!(
                    "{id} matches several sessions: give more of the id"
                ))
            }
        };
        let (sid, user, tunnel) = (sid.to_string(), entry.user.clone(), entry.tunnel.clone());
        drop(sessions);
        tunnel.close(halfpipe_core::frame::CloseCode::Administrative);
        tracing::warn!(session = %sid, user, "session killed by an administrator");
        self.state.control.audit(
            "session_killed",
            vec![("session".into(), sid), ("user".into(), user)],
        );
        Ok(())
    }

    /// Every user: source (config or api), disabled, live sessions.
    pub fn users_info(&self) -> Vec<Value> {
        let state = &self.state;
        let runtime = state.control.db().users().list();
        let disabled = state.control.db().users().disabled_names();
        let sessions = lock(&state.sessions);
        let live = |name: &str| sessions.values().filter(|e| e.user == name).count();
        let mut out: Vec<Value> = read(&state.reloadable)
            .config_users
            .iter()
            .map(|u| {
                let mut v = json!({
                    "name": u.name,
                    "public_key": encode_key(&u.public_key),
                    "source": "config",
                    "disabled": disabled.contains(&u.name),
                    "sessions": live(&u.name),
                });
                v["usage"] = self.user_usage(&u.name);
                v
            })
            .collect();
        for u in &runtime {
            let mut v = json!({
                "name": u.name,
                "public_key": encode_key(&u.public_key),
                "source": "api",
                "disabled": u.disabled,
                "sessions": live(&u.name),
            });
            v["usage"] = self.user_usage(&u.name);
            out.push(v);
        }
        out
    }

    fn is_config_user(&self, name: &str) -> bool {
        read(&self.state.reloadable)
            .config_users
            .iter()
            .any(|u| u.name == name)
    }

    /// Adds a user through the admin API (persisted in the state database).
    pub fn add_user(&self, name: &str, public_key: &str) -> Result<(), String> {
        let key = decode_public(public_key, "public key").map_err(|_| {
            "public_key is not a public key (44 characters of base64, as printed by 'halfpipe keys gen')".to_string()
        })?;
        let reloadable = read(&self.state.reloadable);
        if let Some(u) = reloadable
            .config_users
            .iter()
            .find(|u| u.name == name || u.public_key == key)
        {
            return Err(format!(
                "{} is already a user in the config file with that name or key",
                u.name
            ));
        }
        self.state
            .control
            .db()
            .users()
            .add(name, key, wall_ms())
            .map_err(|e| e.to_string())?;
        rebuild_users(&self.state);
        self.state
            .control
            .audit("user_added", vec![("user".into(), name.into())]);
        Ok(())
    }

    /// Adds a user with a fresh key pair and returns their share link, shown this once.
    /// With a key store the user's key is issued by the store and stays sealed in it
    /// (revoked when the user is removed); without one the exit keeps only the public key.
    pub fn add_user_with_link(&self, name: &str) -> Result<Value, String> {
        let (secret, public) = self.issue_user_key(name)?;
        let keys = read(&self.state.keys);
        let issued = self
            .state
            .links
            .issue(keys.active_public, name, secret, keys.active.psk.clone())
            .map_err(|e| {
                format!(
                    "cannot make a link: {e} (set [links] uplink/downlink in the server config)"
                )
            })
            .and_then(|link| {
                self.add_user(name, &encode_key(&public))?;
                Ok(link)
            });
        let link = match issued {
            Ok(link) => link,
            Err(e) => {
                self.revoke_user_key(name);
                return Err(e);
            }
        };
        Ok(json!({
            "added": name,
            "public_key": encode_key(&public),
            "link": link.encode().as_str(),
        }))
    }

    /// A fresh key pair for `name`: from the key store when there is one (sealed there,
    /// with a "created" audit event), else from the system RNG.
    fn issue_user_key(&self, name: &str) -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), String> {
        let Some((store, _)) = &self.state.store else {
            return halfpipe_core::handshake::generate_keypair().map_err(|e| e.to_string());
        };
        let mut s = lock(store);
        let kind = halfpipe_keystore::KeyKind::UserStatic;
        let info = s
            .generate(kind, Some(name), wall_ms())
            .map_err(|e| e.to_string())?;
        let secret = s
            .with_secret(&info.id, |b| Zeroizing::new(*b))
            .map_err(|e| e.to_string())?;
        self.audit_key_events(&mut s);
        let public = info
            .public
            .ok_or("the key store made a key without a public key")?;
        Ok((secret, public))
    }

    /// Revokes (wipes) the key the store issued to `name`, if any.
    fn revoke_user_key(&self, name: &str) {
        let Some((store, _)) = &self.state.store else {
            return;
        };
        let mut s = lock(store);
        let kind = halfpipe_keystore::KeyKind::UserStatic;
        if let Some(k) = s.active_labelled(kind, name) {
            if let Err(e) = s.revoke(&k.id, wall_ms()) {
                tracing::error!(target: "security", user = name, error = %e, "cannot revoke the user's key in the key store");
            }
        }
        self.audit_key_events(&mut s);
    }

    /// Removes an API-added user and closes their sessions.
    pub fn remove_user(&self, name: &str) -> Result<(), String> {
        if self.is_config_user(name) {
            return Err(format!(
                "{name} is defined in the config file: remove it there and reload"
            ));
        }
        self.state
            .control
            .db()
            .users()
            .remove(name)
            .map_err(|e| e.to_string())?;
        rebuild_users(&self.state);
        close_sessions(&self.state, |u| u == name, "user removed");
        self.revoke_user_key(name);
        self.state
            .control
            .audit("user_removed", vec![("user".into(), name.into())]);
        Ok(())
    }

    /// Disables (closing their sessions) or enables a user, config or API.
    pub fn set_user_disabled(&self, name: &str, disabled: bool) -> Result<(), String> {
        let users = self.state.control.db().users();
        if self.is_config_user(name) {
            users
                .set_name_disabled(name, disabled)
                .map_err(|e| e.to_string())?;
        } else {
            users
                .set_disabled(name, disabled)
                .map_err(|e| e.to_string())?;
        }
        rebuild_users(&self.state);
        if disabled {
            close_sessions(&self.state, |u| u == name, "user disabled");
        }
        self.state.control.audit(
            if disabled {
                "user_disabled"
            } else {
                "user_enabled"
            },
            vec![("user".into(), name.into())],
        );
        Ok(())
    }

    /// Verifies the audit log (as `halfpipe log verify` would, with the server's key).
    pub fn verify_log(&self) -> Value {
        let p = &self.state.control.settings().paths;
        let key = halfpipe_audit::AuditKey::load(&p.audit_key)
            .map(|k| k.public_bytes())
            .ok();
        let report = halfpipe_audit::verify(&p.audit_log, Some(&p.audit_head), key);
        crate::audit_report_json(&report)
    }

    /// The last `n` audit records.
    pub fn log_tail(&self, n: usize) -> Result<Value, String> {
        let p = &self.state.control.settings().paths;
        let records = halfpipe_audit::tail(&p.audit_log, n).map_err(|e| e.to_string())?;
        Ok(json!({ "records": records }))
    }

    /// Re-reads the configuration file: users, egress allow list, limits, rates and
    /// RESTRICTED lists. Sessions of removed users are closed; everyone else keeps going.
    /// Listener addresses and keys need a restart.
    pub fn reload(&self) -> Result<Value, String> {
        let Some(path) = &self.state.config_file else {
            return Err("this server was not started from a config file".into());
        };
        let settings = crate::config::load_server(path, &crate::config::process_env)
            .map_err(|e| format!("{e}\n(the running configuration is unchanged)"))?;
        let old = read(&self.state.reloadable);
        let old_names: BTreeSet<&str> = old.config_users.iter().map(|u| u.name.as_str()).collect();
        let new_names: BTreeSet<&str> = settings.users.iter().map(|u| u.name.as_str()).collect();
        let added: Vec<String> = new_names
            .difference(&old_names)
            .map(|s| s.to_string())
            .collect();
        let removed: Vec<String> = old_names
            .difference(&new_names)
            .map(|s| s.to_string())
            .collect();
        // A user whose key changed counts as removed (their sessions were made with the old key).
        let rekeyed: Vec<String> = settings
            .users
            .iter()
            .filter(|n| {
                old.config_users
                    .iter()
                    .any(|o| o.name == n.name && o.public_key != n.public_key)
            })
            .map(|u| u.name.clone())
            .collect();
        *self
            .state
            .reloadable
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(Reloadable {
            config_users: settings.users,
            egress: settings.egress,
            limits: settings.limits,
        });
        self.state
            .control
            .reload(settings.control.rates, settings.control.restricted);
        rebuild_users(&self.state);
        let gone: BTreeSet<&str> = removed.iter().chain(&rekeyed).map(String::as_str).collect();
        let closed = close_sessions(&self.state, |u| gone.contains(u), "user removed by reload");
        tracing::info!(?added, ?removed, ?rekeyed, closed, "configuration reloaded");
        self.state.control.audit(
            "config_reload",
            vec![
                ("added".into(), added.join(",")),
                ("removed".into(), removed.join(",")),
                ("rekeyed".into(), rekeyed.join(",")),
                ("sessions_closed".into(), closed.to_string()),
            ],
        );
        Ok(json!({
            "added": added,
            "removed": removed,
            "rekeyed": rekeyed,
            "sessions_closed": closed,
        }))
    }

    /// Clean shutdown of the control plane (final audit checkpoint, state flushed).
    pub fn shutdown(&self) {
        self.state.control.shutdown();
    }
}

impl ServerHandle {
    /// The key store's keys: ids, kinds, states, public halves (never a secret).
    pub fn keys_info(&self) -> Result<Value, String> {
        let Some((store, _)) = &self.state.store else {
            return Err(NO_STORE.into());
        };
        let store = lock(store);
        let list: Vec<Value> = store
            .list()
            .into_iter()
            .map(|k| {
                json!({
                    "id": k.id.as_str(),
                    "kind": k.kind.as_str(),
                    "state": k.state,
                    "label": k.label,
                    "public": k.public.map(|p| encode_key(&p)),
                    "created_ms": k.created_ms,
                })
            })
            .collect();
        Ok(json!({ "keys": list }))
    }

    /// Rotates the server's static key: a new key becomes active, the old one is accepted
    /// for `overlap` (default: the configured window) while clients learn the new one.
    pub fn rotate_keys(&self, overlap: Option<std::time::Duration>) -> Result<Value, String> {
        let Some((store, ks)) = &self.state.store else {
            return Err(NO_STORE.into());
        };
        let overlap = overlap.unwrap_or(ks.overlap);
        let now = wall_ms();
        let mut s = lock(store);
        let (old, new) = s
            .rotate(
                halfpipe_keystore::KeyKind::ServerStatic,
                u64::try_from(overlap.as_millis()).unwrap_or(u64::MAX),
                now,
            )
            .map_err(|e| e.to_string())?;
        self.audit_key_events(&mut s);
        let keys = super::keys::ServerKeys::from_store(&s, ks.suite, ks.psk.clone(), now)
            .map_err(|e| e.to_string())?;
        drop(s);
        *self.state.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        let public = new.public.map(|p| encode_key(&p));
        tracing::warn!(target: "security", old = old.id.as_str(), new = new.id.as_str(), ?public, overlap_s = overlap.as_secs(), "server key rotated");
        Ok(json!({
            "old": old.id.as_str(),
            "new": new.id.as_str(),
            "public": public,
            "old_accepted_until_ms": crate::control::ms_after(now, overlap).unwrap_or(u64::MAX),
        }))
    }

    /// Key upkeep (called periodically): a scheduled rotation when the active key is older
    /// than `rotate_every`, a rebuild when an overlap window ended, and wiping keys retired
    /// longer than [`super::keys::RETIRED_KEPT`].
    pub fn maintain_keys(&self) {
        let Some((store, ks)) = &self.state.store else {
            return;
        };
        let now = wall_ms();
        let due = {
            let s = lock(store);
            let active = s.active(halfpipe_keystore::KeyKind::ServerStatic);
            ks.rotate_every.is_some_and(|every| {
                active.is_some_and(|a| now >= a.created_ms.saturating_add(every.as_millis() as u64))
            })
        };
        if due {
            match self.rotate_keys(None) {
                Ok(v) => tracing::info!(%v, "scheduled key rotation"),
                Err(e) => tracing::error!(error = %e, "scheduled key rotation failed"),
            }
        }
        let mut s = lock(store);
        let kept = super::keys::RETIRED_KEPT.as_millis() as u64;
        if let Err(e) = s.expire_retired(now.saturating_sub(kept)) {
            tracing::error!(target: "security", error = %e, "cannot expire retired keys");
            self.state.control.observe(
                halfpipe_control::tripwire::TripwireKind::KeyStoreFailure,
                None,
            );
        }
        self.audit_key_events(&mut s);
        // A window that just ended moves a key from retiring to retired.
        let current = read(&self.state.keys);
        let ended = current.retiring.iter().any(|(_, until)| now >= *until);
        if ended {
            if let Ok(k) = super::keys::ServerKeys::from_store(&s, ks.suite, ks.psk.clone(), now) {
                *self.state.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(k);
            }
        }
    }

    fn audit_key_events(&self, store: &mut halfpipe_keystore::KeyStore) {
        for ev in store.take_events() {
            let fields = crate::control::init::key_event_fields(&ev)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            self.state.control.audit("key_event", fields);
        }
    }
}

const NO_STORE: &str =
    "this exit has no key store: configure [keystore] (see docs/CONTROL.md) to rotate keys";

impl ServerHandle {
    /// Sets a user's policy (expiry, devices, speed limits, transfer quota, allowed
    /// destinations) from the admin API's JSON; an expired user's sessions close at once.
    /// New limits apply to sessions and streams opened from now on.
    pub fn set_user_policy(&self, name: &str, body: &Value) -> Result<Value, String> {
        let known =
            self.is_config_user(name) || self.state.control.db().users().get(name).is_some();
        if !known {
            return Err(format!("no user {name} (see 'halfpipe ctl users list')"));
        }
        let policy: halfpipe_state::policy::UserPolicy = serde_json::from_value(body.clone())
            .map_err(|e| format!("policy: {e} (fields: expires_at_ms, max_sessions, up_bytes_per_sec, down_bytes_per_sec, quota {{bytes, period: day|month}}, allowed_destinations)"))?;
        self.state
            .control
            .db()
            .users()
            .set_policy(name, policy.clone())
            .map_err(|e| e.to_string())?;
        let shown = serde_json::to_value(&policy).unwrap_or_default();
        self.state.control.audit(
            "user_policy",
            vec![
                ("user".into(), name.into()),
                ("policy".into(), shown.to_string()),
            ],
        );
        self.enforce_policies();
        Ok(json!({ "user": name, "policy": shown }))
    }

    /// Closes the sessions of users whose access expired (called every second).
    pub fn enforce_policies(&self) {
        let users = self.state.control.db().users();
        let now = wall_ms();
        let expired: BTreeSet<String> = lock(&self.state.sessions)
            .values()
            .map(|e| e.user.clone())
            .filter(|u| users.policy(u).expired(now))
            .collect();
        if !expired.is_empty() {
            close_sessions(&self.state, |u| expired.contains(u), "user access expired");
        }
    }

    /// A user's policy and quota usage, for `ctl users`.
    fn user_usage(&self, name: &str) -> Value {
        let db = self.state.control.db();
        let policy = db.users().policy(name);
        let usage = policy
            .quota
            .map(|q| db.quotas().usage(name, wall_ms(), Some(q)));
        json!({
            "policy": policy,
            "quota_used": usage.as_ref().map(|u| u.used),
            "quota_limit": usage.as_ref().and_then(|u| u.limit),
            "quota_resets_at_ms": usage.as_ref().map(|u| u.resets_at_ms),
        })
    }
}
