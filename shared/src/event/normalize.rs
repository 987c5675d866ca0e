//! Tolerance rules for old data and client payloads (what OpenHands' own readers accept):
//! legacy keys inside `args`/`extras` are rewritten to the current shape. Kept apart from
//! parsing so that parsing and serializing stays an exact round trip.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::{Kind, pyliteral, schema};

const FILE_EDITOR_PREFIX: &str = "print(file_editor(**";
const FILE_EDITOR_SUFFIX: &str = "))";

/// Keys of action args that are always rewritten or dropped.
const LEGACY_ARGS: &[&str] = &[
    "timestamp",
    "is_confirmed",
    "images_urls",
    "keep_prompt",
    "task_completed",
    "translated_ipython_code",
];

/// Keys of observation extras that are always rewritten or dropped.
const LEGACY_EXTRAS: &[&str] = &["exit_code", "command_id", "formatted_output_and_error"];

fn risk_is_valid(v: &Value) -> bool {
    v.as_i64().is_some_and(|n| (-1..=2).contains(&n))
}

/// `args`/`extras` as normalization would leave them: borrowed when nothing would change.
pub(super) fn view(kind: &Kind) -> Cow<'_, Map<String, Value>> {
    match kind {
        Kind::Action { action, args, .. } => {
            let legacy = LEGACY_ARGS.iter().any(|k| args.contains_key(*k))
                || args.get("security_risk").is_some_and(|v| !risk_is_valid(v));
            if !legacy {
                return Cow::Borrowed(args);
            }
            let mut args = args.clone();
            action_args(action, &mut args);
            Cow::Owned(args)
        }
        Kind::Observation {
            observation,
            extras,
            ..
        } => {
            let legacy = LEGACY_EXTRAS.iter().any(|k| extras.contains_key(*k))
                || (observation == "run" && !extras.get("metadata").is_some_and(Value::is_object));
            if !legacy {
                return Cow::Borrowed(extras);
            }
            let mut extras = extras.clone();
            observation_extras(observation, &mut extras);
            Cow::Owned(extras)
        }
    }
}

/// Rewrites legacy action args in place. Returns the `timestamp` found inside `args` (the
/// frontend puts one there), which the caller uses when the event has none.
pub(super) fn action_args(action: &str, args: &mut Map<String, Value>) -> Option<String> {
    let timestamp = match args.shift_remove("timestamp") {
        Some(Value::String(ts)) if !ts.is_empty() => Some(ts),
        _ => None,
    };
    rename(args, "is_confirmed", "confirmation_state");
    rename(args, "images_urls", "image_urls");
    args.shift_remove("keep_prompt");
    args.shift_remove("task_completed");
    if let Some(code) = args.shift_remove("translated_ipython_code") {
        let kwargs = code
            .as_str()
            .and_then(|c| c.strip_prefix(FILE_EDITOR_PREFIX))
            .and_then(|c| c.strip_suffix(FILE_EDITOR_SUFFIX))
            .and_then(pyliteral::parse);
        // Like OpenHands: a value that does not parse is just dropped.
        if let Some(Value::Object(kwargs)) = kwargs {
            args.extend(kwargs);
        }
        // `view` was translated to a `read` action, which has no `command`.
        if action == "read" && args.get("command").and_then(Value::as_str) == Some("view") {
            args.shift_remove("command");
        }
    }
    if args.get("security_risk").is_some_and(|v| !risk_is_valid(v)) {
        args.shift_remove("security_risk");
    }
    timestamp
}

fn rename(map: &mut Map<String, Value>, old: &str, new: &str) {
    if let Some(v) = map.shift_remove(old) {
        map.insert(new.to_owned(), v);
    }
}

/// Rewrites legacy observation extras in place: `exit_code`/`command_id` move into
/// `metadata`, `formatted_output_and_error` is dropped, and `run` observations get a
/// complete `metadata` object.
pub(super) fn observation_extras(observation: &str, extras: &mut Map<String, Value>) {
    for (old, new) in [("exit_code", "exit_code"), ("command_id", "pid")] {
        if let Some(v) = extras.shift_remove(old) {
            update_metadata(extras, |m| {
                m.insert(new.to_owned(), v);
            });
        }
    }
    extras.shift_remove("formatted_output_and_error");
    if observation == "run" {
        update_metadata(extras, |m| {
            for (k, v) in schema::default_cmd_metadata() {
                m.entry(k).or_insert(v);
            }
        });
    }
}

/// Applies `f` to `extras.metadata`, which is first set to the default metadata object when
/// it is missing or not an object (keeping the key's position when it exists).
fn update_metadata(extras: &mut Map<String, Value>, f: impl FnOnce(&mut Map<String, Value>)) {
    if let Some(Value::Object(metadata)) = extras.get_mut("metadata") {
        f(metadata);
        return;
    }
    let mut metadata = schema::default_cmd_metadata();
    f(&mut metadata);
    extras.insert("metadata".to_owned(), Value::Object(metadata));
}
