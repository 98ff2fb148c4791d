//! The model face's request formats (`src/model/format.rs`) on any JSON.
//!
//! Properties, for each of the three formats:
//! - reading never panics, whatever the JSON's shape;
//! - a rewrite of a claim keeps every other byte: replacing one tool result's text changes the
//!   body only under that result's slot, and the result then reads back with the new text;
//! - a note appended to a user text keeps what it said and changes nothing else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use taskgate::model::format::{
    all_result_texts, append_note, newest_results, newest_user_texts, replace, Format, Slot,
    TextSlot,
};

fn list(format: Format) -> &'static str {
    match format {
        Format::OpenAiResponses => "input",
        Format::OpenAiChat | Format::Anthropic => "messages",
    }
}

fn slot_pointer(slot: Slot) -> String {
    match slot {
        Slot::Message(i) => format!("/messages/{i}"),
        Slot::Item(i) => format!("/input/{i}"),
        Slot::Block(i, j) => format!("/messages/{i}/content/{j}"),
    }
}

fn text_pointer(format: Format, slot: TextSlot) -> String {
    match slot {
        TextSlot::Whole(i) => format!("/{}/{i}/content", list(format)),
        TextSlot::Part(i, j) => format!("/{}/{i}/content/{j}/text", list(format)),
    }
}

/// `body` with the value at `pointer` blanked out, to compare everything else.
fn without(body: &Value, pointer: &str) -> Value {
    let mut body = body.clone();
    if let Some(v) = body.pointer_mut(pointer) {
        *v = Value::Null;
    }
    body
}

fuzz_target!(|input: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(input) else {
        return;
    };
    for format in [
        Format::OpenAiChat,
        Format::OpenAiResponses,
        Format::Anthropic,
    ] {
        let _ = all_result_texts(format, &body);
        for result in newest_results(format, &body) {
            for error in [false, true] {
                let mut rewritten = body.clone();
                replace(&mut rewritten, result.slot, "REWRITTEN", error);
                let pointer = slot_pointer(result.slot);
                assert_eq!(
                    without(&rewritten, &pointer),
                    without(&body, &pointer),
                    "a rewrite changed something outside {pointer}"
                );
                let back = newest_results(format, &rewritten);
                assert!(
                    back.iter().any(|r| r.slot == result.slot
                        && r.text == "REWRITTEN"
                        && r.tool == result.tool),
                    "the rewrite at {pointer} does not read back"
                );
            }
        }
        for text in newest_user_texts(format, &body) {
            let mut noted = body.clone();
            append_note(format, &mut noted, text.slot, "NOTE");
            let pointer = text_pointer(format, text.slot);
            assert_eq!(without(&noted, &pointer), without(&body, &pointer));
            assert_eq!(
                noted.pointer(&pointer).and_then(Value::as_str),
                Some(format!("{}\n\nNOTE", text.text).as_str())
            );
        }
    }
});
