//! Data-driven tests of [`to_messages`]: each case in `tests/data/codeact_to_messages.json` is
//! a history of OpenHands events (parsed as [`Event`]) and the chat messages the model must
//! see for it, written in a compact JSON form (see [`compact`]).

use serde_json::{Value, json};
use shared::event::Event;

use super::to_messages;
use crate::llm::ChatMessage;

const CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/codeact_to_messages.json"
));

/// A message as the cases write it: `role` and `content`, plus `tool_calls` (`id`, `name`,
/// `arguments`) when there are any, and `tool_call_id` and `name` when set.
fn compact(m: &ChatMessage) -> Value {
    let calls: Vec<Value> = m
        .tool_calls
        .iter()
        .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
        .collect();
    let mut v = json!({
        "role": format!("{:?}", m.role).to_lowercase(),
        "content": m.content,
        "tool_calls": calls,
        "tool_call_id": m.tool_call_id,
        "name": m.name,
    });
    if let Value::Object(fields) = &mut v {
        fields.retain(|k, x| k == "content" || !(x.is_null() || x == &json!([])));
    }
    v
}

#[test]
fn every_case_gives_its_messages() {
    let doc: Value = serde_json::from_str(CASES).expect("cases are JSON");
    let cases = doc["cases"].as_array().expect("a `cases` array");
    assert!(cases.len() >= 10, "{} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().expect("every case has a name");
        let history: Vec<Event> = case["events"]
            .as_array()
            .expect("`events` array")
            .iter()
            .map(|v| {
                Event::from_value(v.clone()).unwrap_or_else(|e| panic!("{name}: event {v}: {e}"))
            })
            .collect();
        let got: Vec<Value> = to_messages("SYS", &history).iter().map(compact).collect();
        assert_eq!(
            Value::Array(got.clone()),
            case["messages"],
            "case {name:?}; got:\n{}",
            serde_json::to_string_pretty(&got).unwrap_or_default()
        );
    }
}

#[test]
fn an_empty_history_is_the_system_prompt_alone() {
    let got: Vec<Value> = to_messages("SYS", &[]).iter().map(compact).collect();
    assert_eq!(got, vec![json!({"role": "system", "content": "SYS"})]);
}
