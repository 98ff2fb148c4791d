//! The SSE framer (`src/opencode/sse.rs`) under any byte stream, split anywhere.
//!
//! Input: byte 0 picks the frame cap (small caps exercise the raw pass-through), byte 1 the
//! number of cuts, the next bytes the cut lengths, the rest is the stream.
//!
//! Properties:
//! - nothing lost, nothing invented: frames + raw chunks + the unfinished tail, concatenated,
//!   are the stream byte for byte, under every split;
//! - a split does not change the frames: without going raw, the frames are those of the stream
//!   pushed in one piece;
//! - every frame is whole: framed again on its own it is exactly one frame;
//! - `replace_data` changes only the data: the rewritten frame parses back to the new data,
//!   with the frame's `event` and `id`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskgate::opencode::sse::{parse, replace_data, Chunk, Framer};

fn run(max_frame: usize, cuts: &[usize], stream: &[u8]) -> (Vec<Chunk>, Option<Vec<u8>>, bool) {
    let mut framer = Framer::new(max_frame);
    let mut out = Vec::new();
    let mut rest = stream;
    for &cut in cuts {
        let (piece, tail) = rest.split_at(cut.min(rest.len()));
        out.extend(framer.push(piece));
        rest = tail;
    }
    out.extend(framer.push(rest));
    let raw = framer.is_raw();
    (out, framer.finish().map(|b| b.to_vec()), raw)
}

fuzz_target!(|input: &[u8]| {
    let [cap, count, rest @ ..] = input else {
        return;
    };
    let count = usize::from(*count % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(count);
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c)).collect();
    // 0 means the default cap; otherwise a small one, so raw mode is reached.
    let max_frame = match cap {
        0 => taskgate::opencode::sse::MAX_FRAME,
        n => usize::from(*n),
    };

    let (chunks, tail, raw) = run(max_frame, &cuts, stream);
    let mut relayed = Vec::new();
    for chunk in &chunks {
        match chunk {
            Chunk::Frame(b) | Chunk::Raw(b) => relayed.extend_from_slice(b),
        }
    }
    relayed.extend(tail.iter().flatten());
    assert_eq!(relayed, stream, "bytes lost or invented");

    let (whole, whole_tail, whole_raw) = run(max_frame, &[], stream);
    if !raw && !whole_raw {
        assert_eq!(chunks, whole, "the split changed the frames");
        assert_eq!(tail, whole_tail);
    }

    for chunk in &chunks {
        let Chunk::Frame(frame) = chunk else { continue };
        // Followed by one more byte: a frame may end in a lone `\r`, which is only known to
        // be a whole line ending once the next byte is not `\n`.
        let mut followed = frame.to_vec();
        followed.push(b'x');
        let (again, again_tail, _) = run(usize::MAX, &[], &followed);
        assert_eq!(
            again,
            vec![Chunk::Frame(frame.clone())],
            "not one whole frame"
        );
        assert_eq!(again_tail.as_deref(), Some(&b"x"[..]));

        if let Some(fields) = parse(frame) {
            let data = "rewritten\nsecond line";
            let rewritten = replace_data(frame, data);
            let back = parse(&rewritten).expect("a rewritten frame has data");
            assert_eq!(back.data, data);
            assert_eq!(back.event, fields.event);
            assert_eq!(back.id, fields.id);
        }
    }
});
