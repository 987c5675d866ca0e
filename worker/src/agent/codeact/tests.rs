//! Data-driven tests of [`to_messages`]: each case in `tests/data/codeact_to_messages.json` is
//! a history of OpenHands events (parsed as [`Event`]) and the chat messages the model must
//! see for it, written in a compact JSON form (see [`compact`]).

use serde_json::{Value, json};
use shared::event::Event;

use super::to_messages;

const CASES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/codeact_to_messages.json"
));

/// A message as the cases write it: `role` and `content`, plus `tool_calls` (`id`, `name`,
/// `arguments`) when there are any, and `tool_call_id` and `name` when set; read from the
/// message's wire JSON.
fn compact(wire: &str) -> Value {
    let m: Value = serde_json::from_str(wire).expect("wire JSON");
    let calls: Vec<Value> = m["tool_calls"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    json!({"id": c["id"], "name": c["function"]["name"],
                           "arguments": c["function"]["arguments"]})
                })
                .collect()
        })
        .unwrap_or_default();
    let mut v = json!({
        "role": m["role"],
        "content": m["content"],
        "tool_calls": calls,
        "tool_call_id": m.get("tool_call_id"),
        "name": m.get("name"),
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
        let got: Vec<Value> = to_messages("SYS", &history)
            .iter()
            .map(|w| compact(w))
            .collect();
        assert_eq!(
            Value::Array(got.clone()),
            case["messages"],
            "case {name:?}; got:\n{}",
            serde_json::to_string_pretty(&got).unwrap_or_default()
        );
    }
}

/// The chat kept step by step (one event more at each step, as a conversation grows) sends
/// exactly what converting the whole history sends, at every length of every case; a shorter
/// history than the one seen starts over.
#[test]
fn the_chat_kept_step_by_step_equals_the_whole_conversion() {
    let doc: Value = serde_json::from_str(CASES).expect("cases are JSON");
    for case in doc["cases"].as_array().expect("a `cases` array") {
        let name = case["name"].as_str().unwrap_or_default();
        let history: Vec<Event> = case["events"]
            .as_array()
            .expect("`events` array")
            .iter()
            .filter_map(|v| Event::from_value(v.clone()).ok())
            .collect();
        let mut chat = super::Chat::default();
        for n in 0..=history.len() {
            chat.sync(&history[..n]);
            let whole = to_messages("SYS", &history[..n]);
            assert_eq!(chat.wire("SYS"), whole, "case {name:?} at {n} events");
        }
        // A shorter history than the one seen is not its extension: converted anew.
        let half = history.len() / 2;
        chat.sync(&history[..half]);
        let whole = to_messages("SYS", &history[..half]);
        assert_eq!(chat.wire("SYS"), whole, "case {name:?} cut to {half}");
    }
}

/// A growing chat's buffer is appended to in place once the previous request's body is gone:
/// over 2,000 steps it moves only when it grows (a handful of times), never once per step; a
/// body still held keeps what it had (the append goes to a copy).
#[test]
fn the_chat_buffer_is_appended_in_place_not_copied_per_step() {
    let mut chat = super::Chat::default();
    let mut history = Vec::new();
    let mut moves = 0;
    let mut last_ptr = None;
    for i in 0..2000u64 {
        let mut ev = Event::message(shared::event::Source::User, format!("message {i}"), false);
        ev.id = Some(i);
        history.push(ev);
        chat.sync(&history);
        let (parts, count) = chat.parts("SYS");
        assert_eq!(count, history.len() + 1);
        let ptr = parts[2].as_ptr();
        if last_ptr != Some(ptr) {
            moves += 1;
            last_ptr = Some(ptr);
        }
        // `parts` (the request body) is dropped here, as a step's request is.
    }
    assert!(moves <= 30, "the buffer moved {moves} times in 2,000 steps");
    let (held, _) = chat.parts("SYS");
    let mut ev = Event::message(shared::event::Source::User, "one more".to_owned(), false);
    ev.id = Some(2000);
    history.push(ev);
    chat.sync(&history);
    let (now, count) = chat.parts("SYS");
    assert_eq!(count, 2002);
    assert!(
        !held[2].ends_with(b"one more\"}"),
        "the held body is unchanged"
    );
    assert!(
        now[2].ends_with(b"one more\"}"),
        "{:?}",
        &now[2][now[2].len() - 40..]
    );
}

#[test]
fn an_empty_history_is_the_system_prompt_alone() {
    let got: Vec<Value> = to_messages("SYS", &[]).iter().map(|w| compact(w)).collect();
    assert_eq!(got, vec![json!({"role": "system", "content": "SYS"})]);
}

/// The model's response that called `think` (id `a`) then `finish` (id `b`).
fn two_call_response() -> Value {
    let call = |id: &str, name: &str, args: &str| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}});
    json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
        call("a", "think", r#"{"thought":"x"}"#),
        call("b", "finish", r#"{"message":"done"}"#),
    ]}}]})
}

/// Call `a`'s action (or, with `observation`, its observation) as CodeAct records it.
fn call_a(id: u64, observation: bool) -> Event {
    let mut ev = if observation {
        let mut o = Event::think_observation();
        o.set_cause(Some(id - 1));
        o
    } else {
        Event::think("x")
    };
    ev.source = Some(shared::event::Source::Agent);
    ev.id = Some(id);
    ev.set_tool_call(&shared::event::ToolCallMetadata {
        function_name: "think".into(),
        tool_call_id: "a".into(),
        model_response: two_call_response(),
        total_calls_in_response: 2,
    });
    ev
}

fn user(id: u64, text: &str) -> Event {
    let mut ev = Event::message(shared::event::Source::User, text, false);
    ev.id = Some(id);
    ev
}

#[test]
fn the_calls_left_of_a_response_come_next_until_a_user_speaks() {
    let mut history = vec![user(1, "go"), call_a(2, false), call_a(3, true)];
    let next = super::next_call_of_last_response(&history).expect("call b is left");
    assert_eq!(next.action_type(), Some("finish"));
    let call = next.tool_call().expect("metadata");
    assert_eq!((call.tool_call_id, call.function_name), ("b", "finish"));
    assert_eq!(
        next.tool_call_metadata
            .as_ref()
            .map(|m| m["total_calls_in_response"].clone()),
        Some(json!(2))
    );
    // Once b is in the log, nothing is left.
    history.push(next);
    assert!(super::next_call_of_last_response(&history).is_none());
    // A user message after a: b is dropped (the model sees the message instead).
    let history = vec![
        user(1, "go"),
        call_a(2, false),
        call_a(3, true),
        user(4, "wait"),
    ];
    assert!(super::next_call_of_last_response(&history).is_none());
    // A response with one call has nothing left.
    assert!(super::next_call_of_last_response(&[user(1, "go")]).is_none());
}
