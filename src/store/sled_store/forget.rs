//! `forget`: everything the store holds about one user goes — turns, index rows, the
//! user record and usernames, cache entries they originated, pending replies to them in
//! `handled`, and their id, usernames and words in the audit log.

use std::collections::HashSet;

use super::layout::normalise_username;
use super::{io, SledStore};
use crate::domain::UserRef;
use crate::store::codec::Codec as _;
use crate::store::{
    clear_conversations_of, AuditEntry, CacheEntry, ForgetReport, Handled, HandledEntry,
    StoreResult, UserRecord,
};

/// What a forgotten user is called in the audit log.
pub const FORGOTTEN: &str = "[forgotten user]";

/// Replaces `needle` where it is not part of a longer id (`tg:1` must not match `tg:12`),
/// ASCII case-insensitively.
fn replace_whole(hay: &str, needle: &str, with: &str) -> Option<String> {
    if needle.is_empty() {
        return None;
    }
    let lower = hay.to_ascii_lowercase();
    let needle_lower = needle.to_ascii_lowercase();
    let mut out = String::new();
    let mut from = 0;
    let mut hit = false;
    while let Some(pos) = lower[from..].find(&needle_lower).map(|p| p + from) {
        let end = pos + needle.len();
        let longer = hay[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        out.push_str(&hay[from..pos]);
        out.push_str(if longer { &hay[pos..end] } else { with });
        hit |= !longer;
        from = end;
    }
    out.push_str(&hay[from..]);
    hit.then_some(out)
}

/// Keeps the command's name (`/admin ban`); the rest named or quoted the user.
fn redact_command(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        [a, b, _, ..] => format!("{a} {b} [redacted]"),
        [a, _] if !a.starts_with('/') => "[redacted]".to_string(),
        _ if !command.starts_with('/') => "[redacted]".to_string(),
        _ => command.to_string(),
    }
}

impl SledStore {
    pub(super) fn forget(&self, user: &UserRef) -> StoreResult<ForgetReport> {
        let mut report = ForgetReport::default();
        let replies = clear_conversations_of(self, user, &mut report)?;
        let mut aliases = Vec::new();
        {
            let _gate = self.write_gate();
            let ukey = self.user_key(user);
            let removed = {
                let _lock = self.user_lock(&ukey);
                self.users.remove(&ukey).map_err(io)?
            };
            if let Some(v) = removed {
                report.user_record = true;
                let rec = self.decode::<UserRecord>("users", &ukey, &v);
                aliases.extend(rec.and_then(|r| r.username));
            }
            // Every username pointing at this user (renamed users, older names).
            for item in self.usernames.iter() {
                let (k, v) = item.map_err(io)?;
                if self.username_points_at(&k, &v, user) {
                    if self.keys.is_none() {
                        let name = String::from_utf8_lossy(&k);
                        aliases.extend(name.split_once(':').map(|(_, n)| n.to_string()));
                    }
                    self.usernames.remove(k).map_err(io)?;
                }
            }
        }
        for item in self.cache.iter() {
            let (k, v) = item.map_err(io)?;
            let Ok(row) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            if self
                .decode::<CacheEntry>("cache", &k, &v)
                .is_some_and(|e| &e.origin == user)
            {
                self.cache_remove_row(&row)?;
                report.cache_entries += 1;
            }
        }
        self.forget_handled(user, &replies)?;
        let aliases: Vec<String> = aliases.iter().map(|a| normalise_username(a)).collect();
        self.forget_in_audit(user, &aliases)?;
        Ok(report)
    }

    /// Pending replies to the user (they hold the reply text).
    fn forget_handled(&self, user: &UserRef, replies: &HashSet<String>) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.handled.iter() {
            let (k, v) = item.map_err(io)?;
            let Some(entry) = self.decode::<HandledEntry>("handled", &k, &v) else {
                continue;
            };
            let theirs = entry.user.as_ref() == Some(user)
                || matches!(&entry.state, Handled::Pending { reply } if replies.contains(reply));
            if theirs {
                self.handled.remove(k).map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Audit entries keep what was done, not to whom or in whose words: the user's id
    /// and usernames become [`FORGOTTEN`], and a command naming them keeps only its name.
    fn forget_in_audit(&self, user: &UserRef, aliases: &[String]) -> StoreResult<usize> {
        let _gate = self.write_gate();
        let mut n = 0;
        for item in self.audit.iter() {
            let (k, v) = item.map_err(io)?;
            let Some(mut e) = self.decode::<AuditEntry>("audit", &k, &v) else {
                continue;
            };
            if !scrub_audit_entry(&mut e, user, aliases) {
                continue;
            }
            self.audit
                .insert(&k, self.encode("audit", &k, &e)?)
                .map_err(io)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Rewrites an audit entry that names `user` (by id or one of their `aliases`, the
/// normalised usernames): their id and names become [`FORGOTTEN`], a command naming
/// them keeps only its name. False when the entry is not about them (left as it is).
pub(in crate::store) fn scrub_audit_entry(
    e: &mut AuditEntry,
    user: &UserRef,
    aliases: &[String],
) -> bool {
    let me = user.to_string();
    let names: Vec<String> = std::iter::once(me.clone())
        .chain(aliases.iter().map(|a| format!("@{a}")))
        .chain(
            aliases
                .iter()
                .map(|a| format!("{}:@{a}", user.platform.prefix())),
        )
        .collect();
    let scrub = |s: &str| -> Option<String> {
        let mut out: Option<String> = None;
        for n in &names {
            if let Some(r) = replace_whole(out.as_deref().unwrap_or(s), n, FORGOTTEN) {
                out = Some(r);
            }
        }
        out
    };
    let by_them = e.actor == me;
    let target = e.target.as_deref().map(|t| (t == me, scrub(t)));
    let command = scrub(&e.command);
    let result = scrub(&e.result);
    let about_them = matches!(target, Some((true, _)) | Some((_, Some(_))));
    if !(by_them || about_them || command.is_some() || result.is_some()) {
        return false;
    }
    if by_them {
        e.actor = FORGOTTEN.to_string();
    }
    if let Some((exact, scrubbed)) = target {
        if exact || scrubbed.is_some() {
            e.target = Some(FORGOTTEN.to_string());
        }
    }
    e.command = redact_command(&e.command);
    if let Some(r) = result {
        e.result = r;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_ids_and_names_only() {
        assert_eq!(
            replace_whole("ban tg:1 and tg:12", "tg:1", "X").as_deref(),
            Some("ban X and tg:12")
        );
        assert_eq!(replace_whole("tg:12", "tg:1", "X"), None);
        assert_eq!(
            replace_whole("ban @Ann_B now", "@ann_b", "X").as_deref(),
            Some("ban X now")
        );
        assert_eq!(replace_whole("ban @ann_bc", "@ann_b", "X"), None);
    }

    #[test]
    fn redacted_commands_keep_their_name() {
        assert_eq!(
            redact_command("/admin ban tg:7 said rude things"),
            "/admin ban [redacted]"
        );
        assert_eq!(redact_command("/admin stats"), "/admin stats");
        assert_eq!(redact_command("hello there"), "[redacted]");
    }
}
