//! User preferences: `user-prefs:<userId>`, one hash field per preference, TTL refreshed on
//! every read and write.
//!
//! Each leaf of the preference tree is its own hash field (`theme`, `notifications.email`,
//! `ui.pageSize`, ...), so one preference is updated with one `HSET` field without reading or
//! rewriting the others, and services of different versions can share a record: a field this
//! version does not know is ignored on read and left untouched on write; a field it knows but
//! that is missing reads as its default.
//!
//! Encoding of the values (see `docs/keyspace.md`):
//! - booleans: `true` / `false` (`1` / `0` are accepted on read);
//! - numbers: decimal integers (`25`);
//! - enums: their lowercase wire names (`dark`, `comfortable`);
//! - strings: the UTF-8 text itself, unquoted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::HashFields;
use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::pool::Redis;

/// Smallest accepted `ui.pageSize`.
pub const MIN_PAGE_SIZE: u32 = 1;
/// Largest accepted `ui.pageSize`.
pub const MAX_PAGE_SIZE: u32 = 200;
/// Longest accepted `emailSettings.signature`, in bytes.
pub const MAX_SIGNATURE_BYTES: usize = 8 * 1024;
/// Longest accepted `language` (a BCP 47 tag), in bytes.
pub const MAX_LANGUAGE_BYTES: usize = 35;
/// Longest accepted `timezone` (an IANA zone name), in bytes.
pub const MAX_TIMEZONE_BYTES: usize = 64;

/// Every hash field this version reads and writes, in documentation order.
pub const KNOWN_FIELDS: [&str; 12] = [
    "theme",
    "language",
    "timezone",
    "notifications.email",
    "notifications.push",
    "notifications.security",
    "emailSettings.signature",
    "emailSettings.autoReply",
    "emailSettings.filtering",
    "ui.pageSize",
    "ui.layout",
    "ui.sidebarCollapsed",
];

/// Colour theme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Theme {
    /// `light`.
    Light,
    /// `dark`.
    Dark,
    /// `system` (the default): follow the operating system.
    #[default]
    System,
}

impl Theme {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Theme::Light => "light",
            Theme::Dark => "dark",
            Theme::System => "system",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "light" => Some(Theme::Light),
            "dark" => Some(Theme::Dark),
            "system" => Some(Theme::System),
            _ => None,
        }
    }
}

/// List density.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `compact`.
    Compact,
    /// `comfortable` (the default).
    #[default]
    Comfortable,
}

impl Layout {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Layout::Compact => "compact",
            Layout::Comfortable => "comfortable",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "compact" => Some(Layout::Compact),
            "comfortable" => Some(Layout::Comfortable),
            _ => None,
        }
    }
}

/// Which notifications the user receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct NotificationPrefs {
    /// `notifications.email`, default `true`.
    pub email: bool,
    /// `notifications.push`, default `true`.
    pub push: bool,
    /// `notifications.security`, default `true`.
    pub security: bool,
}

impl Default for NotificationPrefs {
    fn default() -> Self {
        NotificationPrefs {
            email: true,
            push: true,
            security: true,
        }
    }
}

/// Mail composition and filtering settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct EmailSettings {
    /// `emailSettings.signature`, default empty, at most [`MAX_SIGNATURE_BYTES`].
    pub signature: String,
    /// `emailSettings.autoReply`, default `false`.
    pub auto_reply: bool,
    /// `emailSettings.filtering`, default `true`.
    pub filtering: bool,
}

impl Default for EmailSettings {
    fn default() -> Self {
        EmailSettings {
            signature: String::new(),
            auto_reply: false,
            filtering: true,
        }
    }
}

/// User interface settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct UiPrefs {
    /// `ui.pageSize`, default 25, in [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// `ui.layout`, default [`Layout::Comfortable`].
    pub layout: Layout,
    /// `ui.sidebarCollapsed`, default `false`.
    pub sidebar_collapsed: bool,
}

impl Default for UiPrefs {
    fn default() -> Self {
        UiPrefs {
            page_size: 25,
            layout: Layout::Comfortable,
            sidebar_collapsed: false,
        }
    }
}

/// A user's preferences; fields missing from the stored record hold their defaults.
///
/// Serializes (for export) as the documented `UserPreferences` JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct UserPreferences {
    /// `theme`, default [`Theme::System`].
    pub theme: Theme,
    /// `language`, a BCP 47 tag, default `en`.
    pub language: String,
    /// `timezone`, an IANA zone name, default `UTC`.
    pub timezone: String,
    /// `notifications.*`.
    pub notifications: NotificationPrefs,
    /// `emailSettings.*`.
    pub email_settings: EmailSettings,
    /// `ui.*`.
    pub ui: UiPrefs,
}

impl Default for UserPreferences {
    fn default() -> Self {
        UserPreferences {
            theme: Theme::System,
            language: "en".into(),
            timezone: "UTC".into(),
            notifications: NotificationPrefs::default(),
            email_settings: EmailSettings::default(),
            ui: UiPrefs::default(),
        }
    }
}

impl UserPreferences {
    /// Every preference as a list of updates (what [`UserPrefs::set`] writes).
    pub fn to_updates(&self) -> Vec<Pref> {
        vec![
            Pref::Theme(self.theme),
            Pref::Language(self.language.clone()),
            Pref::Timezone(self.timezone.clone()),
            Pref::NotifyEmail(self.notifications.email),
            Pref::NotifyPush(self.notifications.push),
            Pref::NotifySecurity(self.notifications.security),
            Pref::Signature(self.email_settings.signature.clone()),
            Pref::AutoReply(self.email_settings.auto_reply),
            Pref::Filtering(self.email_settings.filtering),
            Pref::PageSize(self.ui.page_size),
            Pref::Layout(self.ui.layout),
            Pref::SidebarCollapsed(self.ui.sidebar_collapsed),
        ]
    }

    /// Decodes a stored hash: defaults for missing fields, unknown fields ignored, a known field
    /// that does not decode (or is out of range) is an [`Error::Decode`] naming it.
    ///
    /// A group another service stored as one JSON field (`notifications` =
    /// `{"email":false,..}`, the reference's nested document) is read too: a member counts
    /// where its dotted field is absent (the dotted field wins), under the same rules, and a
    /// group that is not a JSON object is an error naming it. A user's opt-out written that way
    /// is never read as the default.
    pub fn from_fields(fields: &HashFields) -> Result<Self> {
        let mut prefs = UserPreferences::default();
        for name in KNOWN_FIELDS {
            let Some(raw) = fields.get(name) else {
                continue;
            };
            let pref = Pref::decode(name, raw)
                .map_err(|reason| Error::decode(fields.key(), Some(name), reason))?;
            pref.apply(&mut prefs);
        }
        for group in ["notifications", "emailSettings", "ui"] {
            let Some(members) = fields.json::<serde_json::Map<String, serde_json::Value>>(group)?
            else {
                continue;
            };
            for (member, value) in &members {
                let dotted = format!("{group}.{member}");
                if !KNOWN_FIELDS.contains(&dotted.as_str()) || fields.get(&dotted).is_some() {
                    continue;
                }
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Bool(_) | serde_json::Value::Number(_) => value.to_string(),
                    other => {
                        return Err(Error::decode(
                            fields.key(),
                            Some(group),
                            format!(
                                "member {member:?} is {other}, not a string, number or boolean"
                            ),
                        ));
                    }
                };
                let pref = Pref::decode(&dotted, &text).map_err(|reason| {
                    Error::decode(
                        fields.key(),
                        Some(group),
                        format!("member {member:?}: {reason}"),
                    )
                })?;
                pref.apply(&mut prefs);
            }
        }
        Ok(prefs)
    }
}

/// One preference to write: the unit of [`UserPrefs::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pref {
    /// `theme`.
    Theme(Theme),
    /// `language`: non-empty BCP 47 tag (ASCII letters, digits, `-` and `_`), at most
    /// [`MAX_LANGUAGE_BYTES`].
    Language(String),
    /// `timezone`: non-empty IANA zone name (no whitespace or control characters), at most
    /// [`MAX_TIMEZONE_BYTES`].
    Timezone(String),
    /// `notifications.email`.
    NotifyEmail(bool),
    /// `notifications.push`.
    NotifyPush(bool),
    /// `notifications.security`.
    NotifySecurity(bool),
    /// `emailSettings.signature`: at most [`MAX_SIGNATURE_BYTES`].
    Signature(String),
    /// `emailSettings.autoReply`.
    AutoReply(bool),
    /// `emailSettings.filtering`.
    Filtering(bool),
    /// `ui.pageSize`: [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`].
    PageSize(u32),
    /// `ui.layout`.
    Layout(Layout),
    /// `ui.sidebarCollapsed`.
    SidebarCollapsed(bool),
}

fn encode_bool(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

fn decode_bool(raw: &str) -> std::result::Result<bool, String> {
    match raw {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true/false)")),
    }
}

/// The documented encoding only: decimal digits without sign or padding (`u32::from_str` would
/// also take `+25` and `0025`, which other readers of the record may not).
fn decode_page_size(raw: &str) -> std::result::Result<u32, String> {
    let canonical = !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    if !canonical {
        return Err(format!(
            "{raw:?} is not a page size (a decimal integer without sign or padding)"
        ));
    }
    raw.parse::<u32>()
        .map_err(|e| format!("{raw:?} is not a page size: {e}"))
}

fn check_language(value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_LANGUAGE_BYTES {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_LANGUAGE_BYTES}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "contains {c:?}; a language tag is ASCII letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

fn check_timezone(value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_TIMEZONE_BYTES {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_TIMEZONE_BYTES}",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("contains the forbidden character {c:?}"));
    }
    Ok(())
}

fn check_signature(value: &str) -> std::result::Result<(), String> {
    if value.len() > MAX_SIGNATURE_BYTES {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_SIGNATURE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

fn check_page_size(value: u32) -> std::result::Result<(), String> {
    if (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{value} is outside {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
        ))
    }
}

impl Pref {
    /// The hash field this preference is stored in (e.g. `ui.pageSize`).
    pub const fn field(&self) -> &'static str {
        match self {
            Pref::Theme(_) => "theme",
            Pref::Language(_) => "language",
            Pref::Timezone(_) => "timezone",
            Pref::NotifyEmail(_) => "notifications.email",
            Pref::NotifyPush(_) => "notifications.push",
            Pref::NotifySecurity(_) => "notifications.security",
            Pref::Signature(_) => "emailSettings.signature",
            Pref::AutoReply(_) => "emailSettings.autoReply",
            Pref::Filtering(_) => "emailSettings.filtering",
            Pref::PageSize(_) => "ui.pageSize",
            Pref::Layout(_) => "ui.layout",
            Pref::SidebarCollapsed(_) => "ui.sidebarCollapsed",
        }
    }

    /// Checks the value; the error is an [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let checked = match self {
            Pref::Language(v) => check_language(v),
            Pref::Timezone(v) => check_timezone(v),
            Pref::Signature(v) => check_signature(v),
            Pref::PageSize(v) => check_page_size(*v),
            _ => Ok(()),
        };
        checked.map_err(|reason| Error::invalid(self.field(), reason))
    }

    /// The stored text of the value.
    pub fn encode(&self) -> String {
        match self {
            Pref::Theme(t) => t.as_str().into(),
            Pref::Layout(l) => l.as_str().into(),
            Pref::Language(s) | Pref::Timezone(s) | Pref::Signature(s) => s.clone(),
            Pref::PageSize(n) => n.to_string(),
            Pref::NotifyEmail(b)
            | Pref::NotifyPush(b)
            | Pref::NotifySecurity(b)
            | Pref::AutoReply(b)
            | Pref::Filtering(b)
            | Pref::SidebarCollapsed(b) => encode_bool(*b).into(),
        }
    }

    /// Decodes the stored text of `field`; the error says why.
    fn decode(field: &str, raw: &str) -> std::result::Result<Pref, String> {
        let pref = match field {
            "theme" => Pref::Theme(
                Theme::parse(raw).ok_or_else(|| format!("{raw:?} is not light/dark/system"))?,
            ),
            "language" => Pref::Language(raw.to_owned()),
            "timezone" => Pref::Timezone(raw.to_owned()),
            "notifications.email" => Pref::NotifyEmail(decode_bool(raw)?),
            "notifications.push" => Pref::NotifyPush(decode_bool(raw)?),
            "notifications.security" => Pref::NotifySecurity(decode_bool(raw)?),
            "emailSettings.signature" => Pref::Signature(raw.to_owned()),
            "emailSettings.autoReply" => Pref::AutoReply(decode_bool(raw)?),
            "emailSettings.filtering" => Pref::Filtering(decode_bool(raw)?),
            "ui.pageSize" => Pref::PageSize(decode_page_size(raw)?),
            "ui.layout" => Pref::Layout(
                Layout::parse(raw).ok_or_else(|| format!("{raw:?} is not compact/comfortable"))?,
            ),
            "ui.sidebarCollapsed" => Pref::SidebarCollapsed(decode_bool(raw)?),
            other => return Err(format!("unknown field {other:?}")),
        };
        // Stored data is held to the same rules as input, so a record another writer
        // corrupted is reported rather than handed on.
        match &pref {
            Pref::Language(v) => check_language(v)?,
            Pref::Timezone(v) => check_timezone(v)?,
            Pref::Signature(v) => check_signature(v)?,
            Pref::PageSize(v) => check_page_size(*v)?,
            _ => {}
        }
        Ok(pref)
    }

    fn apply(self, prefs: &mut UserPreferences) {
        match self {
            Pref::Theme(v) => prefs.theme = v,
            Pref::Language(v) => prefs.language = v,
            Pref::Timezone(v) => prefs.timezone = v,
            Pref::NotifyEmail(v) => prefs.notifications.email = v,
            Pref::NotifyPush(v) => prefs.notifications.push = v,
            Pref::NotifySecurity(v) => prefs.notifications.security = v,
            Pref::Signature(v) => prefs.email_settings.signature = v,
            Pref::AutoReply(v) => prefs.email_settings.auto_reply = v,
            Pref::Filtering(v) => prefs.email_settings.filtering = v,
            Pref::PageSize(v) => prefs.ui.page_size = v,
            Pref::Layout(v) => prefs.ui.layout = v,
            Pref::SidebarCollapsed(v) => prefs.ui.sidebar_collapsed = v,
        }
    }
}

/// A stored record: the decoded preferences and the fields this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PrefsRecord {
    /// The preferences, with defaults for missing fields.
    pub preferences: UserPreferences,
    /// Fields written by other versions or services, kept as stored.
    pub unknown_fields: BTreeMap<String, String>,
}

/// The `user-prefs:*` repository. Get it with [`Redis::user_prefs`].
#[derive(Debug, Clone)]
pub struct UserPrefs {
    redis: Redis,
}

impl Redis {
    /// The user preferences repository.
    pub fn user_prefs(&self) -> UserPrefs {
        UserPrefs {
            redis: self.clone(),
        }
    }
}

impl UserPrefs {
    fn key(&self, user_id: &str) -> Result<String> {
        prefs_key(&self.redis, user_id)
    }

    /// The user's preferences, defaults for anything not stored (also when nothing is).
    ///
    /// One round trip: `MULTI HGETALL PEXPIRE EXEC`, so reading refreshes the 7-day TTL
    /// atomically with the read; retried on a connection error up to
    /// [`Config::max_retries`](crate::Config::max_retries) times (a repeated `PEXPIRE` sets the
    /// same TTL). A stored value that does not decode is an [`Error::Decode`] naming its field.
    #[tracing::instrument(name = "user_prefs.get", skip_all)]
    pub async fn get(&self, user_id: &str) -> Result<UserPreferences> {
        Ok(self
            .get_record(user_id)
            .await?
            .map(|r| r.preferences)
            .unwrap_or_default())
    }

    /// The stored record with the fields this version does not know, or `None` when the user
    /// has no record. One round trip (`MULTI HGETALL PEXPIRE EXEC`), refreshes the TTL; retried
    /// on a connection error like [`UserPrefs::get`].
    #[tracing::instrument(name = "user_prefs.get_record", skip_all)]
    pub async fn get_record(&self, user_id: &str) -> Result<Option<PrefsRecord>> {
        let key = self.key(user_id)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HGETALL")
            .arg(&key)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.redis.ttl().millis(Keyspace::UserPrefs))
            .ignore();
        let reply = self
            .redis
            .retry_idempotent(|| self.redis.query_pipe("user_prefs.get", &pipe))
            .await?;
        let hash = reply
            .and_then(|mut v| {
                if v.is_empty() {
                    None
                } else {
                    Some(v.remove(0))
                }
            })
            .ok_or_else(|| Error::decode(&key, None, "empty transaction reply"))?;
        let Some(fields) = HashFields::from_reply(&key, hash)? else {
            return Ok(None);
        };
        let preferences = UserPreferences::from_fields(&fields)?;
        let unknown_fields = fields
            .into_fields()
            .into_iter()
            .filter(|(name, _)| !KNOWN_FIELDS.contains(&name.as_str()))
            .collect();
        Ok(Some(PrefsRecord {
            preferences,
            unknown_fields,
        }))
    }

    /// Writes the given preferences and nothing else: other fields (known or not) keep their
    /// stored values. Every value is validated before anything is sent
    /// ([`Error::InvalidInput`] naming the field). An empty list sends nothing.
    ///
    /// One round trip, atomic: `MULTI HSET <field> <value>... PEXPIRE EXEC`.
    ///
    /// ```no_run
    /// # async fn demo(redis: aether_redis::Redis) -> aether_redis::Result<()> {
    /// use aether_redis::user_prefs::{Pref, Theme};
    /// redis.user_prefs().update("u-42", &[Pref::Theme(Theme::Dark), Pref::PageSize(50)]).await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(name = "user_prefs.update", skip_all)]
    pub async fn update(&self, user_id: &str, prefs: &[Pref]) -> Result<()> {
        let key = self.key(user_id)?;
        for pref in prefs {
            pref.validate()?;
        }
        if prefs.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let hset = pipe.cmd("HSET").arg(&key);
        for pref in prefs {
            hset.arg(pref.field()).arg(pref.encode());
        }
        hset.ignore();
        pipe.cmd("PEXPIRE")
            .arg(&key)
            .arg(self.redis.ttl().millis(Keyspace::UserPrefs))
            .ignore();
        self.redis.query_pipe("user_prefs.update", &pipe).await?;
        Ok(())
    }

    /// Writes every known preference; unknown fields are kept. Same round trip and atomicity
    /// as [`UserPrefs::update`].
    #[tracing::instrument(name = "user_prefs.set", skip_all)]
    pub async fn set(&self, user_id: &str, prefs: &UserPreferences) -> Result<()> {
        self.update(user_id, &prefs.to_updates()).await
    }

    /// Deletes the record (all fields, known or not). One round trip; `true` if there was one.
    #[tracing::instrument(name = "user_prefs.delete", skip_all)]
    pub async fn delete(&self, user_id: &str) -> Result<bool> {
        let key = self.key(user_id)?;
        let n: i64 = self
            .redis
            .query_as("user_prefs.delete", &key, redis::cmd("DEL").arg(&key))
            .await?;
        Ok(n > 0)
    }
}

/// `user-prefs:<userId>` for `user_id` (validated).
pub(crate) fn prefs_key(redis: &Redis, user_id: &str) -> Result<String> {
    crate::keyspace::validate_key_part("user id", user_id)?;
    redis.keys().key(Keyspace::UserPrefs, &[user_id])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pref_round_trips_through_its_encoding() {
        let prefs = UserPreferences {
            theme: Theme::Dark,
            language: "pt-BR".into(),
            timezone: "America/Sao_Paulo".into(),
            notifications: NotificationPrefs {
                email: false,
                push: true,
                security: false,
            },
            email_settings: EmailSettings {
                signature: "— A. 😀".into(),
                auto_reply: true,
                filtering: false,
            },
            ui: UiPrefs {
                page_size: 200,
                layout: Layout::Compact,
                sidebar_collapsed: true,
            },
        };
        let mut decoded = UserPreferences::default();
        for pref in prefs.to_updates() {
            pref.validate().unwrap();
            Pref::decode(pref.field(), &pref.encode())
                .unwrap()
                .apply(&mut decoded);
        }
        assert_eq!(decoded, prefs);
        assert_eq!(prefs.to_updates().len(), KNOWN_FIELDS.len());
        for (pref, field) in prefs.to_updates().iter().zip(KNOWN_FIELDS) {
            assert_eq!(pref.field(), field);
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        for (pref, field) in [
            (Pref::PageSize(0), "ui.pageSize"),
            (Pref::PageSize(MAX_PAGE_SIZE + 1), "ui.pageSize"),
            (Pref::Language(String::new()), "language"),
            (Pref::Language("en US".into()), "language"),
            (Pref::Timezone(String::new()), "timezone"),
            (
                Pref::Signature("x".repeat(MAX_SIGNATURE_BYTES + 1)),
                "emailSettings.signature",
            ),
        ] {
            match pref.validate() {
                Err(Error::InvalidInput { what, .. }) => assert_eq!(what, field),
                other => panic!("{pref:?}: {other:?}"),
            }
        }
        // The message lists exactly what is accepted, `_` included (as docs/keyspace.md does).
        assert!(Pref::Language("zh_Hant-TW".into()).validate().is_ok());
        let err = Pref::Language("en US".into()).validate().unwrap_err();
        assert!(err.to_string().contains("digits, '-' and '_'"), "{err}");
        assert!(decode_bool("yes").is_err());
        assert!(Pref::decode("theme", "blue").is_err());
        assert!(Pref::decode("ui.pageSize", "-3").is_err());
        assert!(Pref::decode("ui.pageSize", "1000").is_err());
    }
}
