//! Server-Sent Events, the one framer every reader of an event stream shares.
//!
//! [`Framer`] is sans-io: bytes in, whole frames out, byte for byte. The network splits an
//! event stream wherever it likes (mid-line, between the `\r` and `\n` of a line ending,
//! inside a UTF-8 character); the framer buffers until a frame's blank line arrives. Untouched
//! frames leave exactly as they came, so the gate can relay what it does not rewrite, and only a
//! frame it rewrites is re-encoded ([`replace_data`]). [`SseDecoder`] is the same framer for
//! readers that only want the fields (the oracle's watcher, clients).
//!
//! Why not a parser crate: event-level parsers drop what a transparent proxy must keep
//! (comment lines such as `: keep-alive`, the original line endings, field order).
//!
//! Frame boundaries follow the WHATWG "interpreting an event stream" rules: a line ends at
//! `\r\n`, `\n` or `\r`, and an empty line ends the event.

use bytes::{Bytes, BytesMut};

/// Default largest frame the framer will assemble. Past it the stream is passed through raw.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Output of [`Framer::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// One whole event, terminating blank line included, exactly as received.
    Frame(Bytes),
    /// Bytes relayed without framing (after a frame outgrew the cap: from then on the stream is
    /// not inspected, but nothing is lost).
    Raw(Bytes),
}

/// Splits a byte stream into SSE frames.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    /// Where scanning resumes: the start of the first line not yet known to be complete.
    scan: usize,
    /// Start of the line being scanned: a terminator found right here is an empty line, which
    /// ends the frame.
    line_start: usize,
    max_frame: usize,
    raw: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(MAX_FRAME)
    }
}

impl Framer {
    pub fn new(max_frame: usize) -> Framer {
        Framer {
            buf: BytesMut::new(),
            scan: 0,
            line_start: 0,
            max_frame,
            raw: false,
        }
    }

    /// True once a frame outgrew the cap and the stream went raw.
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Feeds `data`; returns every frame it completes, in order.
    pub fn push(&mut self, data: &[u8]) -> Vec<Chunk> {
        if self.raw {
            return vec![Chunk::Raw(Bytes::copy_from_slice(data))];
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(end) = self.next_frame_end() {
            let frame = self.buf.split_to(end).freeze();
            self.scan = 0;
            self.line_start = 0;
            out.push(Chunk::Frame(frame));
        }
        if self.buf.len() > self.max_frame {
            self.raw = true;
            out.push(Chunk::Raw(self.buf.split().freeze()));
        }
        out
    }

    /// What is left when the stream ends: an unterminated last frame, passed on as it is.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }

    /// Finds the end (exclusive) of the first complete frame in `buf`, scanning from where the
    /// previous call stopped so every byte is looked at once.
    fn next_frame_end(&mut self) -> Option<usize> {
        let buf = &self.buf[..];
        let mut i = self.scan;
        while i < buf.len() {
            let terminator = match buf[i] {
                b'\n' => 1,
                b'\r' => match buf.get(i + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    // A lone `\r` at the end may be the first half of `\r\n`: wait for more.
                    None => break,
                },
                _ => {
                    i += 1;
                    continue;
                }
            };
            let empty_line = i == self.line_start;
            i += terminator;
            self.line_start = i;
            self.scan = i;
            if empty_line {
                return Some(i);
            }
        }
        self.scan = i;
        None
    }
}

/// The fields of one frame (an "event" in the SSE spec; named frame here so it is not confused
/// with a runtime [`super::Event`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// `event:` field, when sent.
    pub event: Option<String>,
    /// `id:` field, when sent.
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`, as the spec says.
    pub data: String,
}

/// Reads the fields of a whole frame. `None` when the frame has no data or is not UTF-8 (such
/// frames are passed through untouched; comments and heartbeats have no data).
pub fn parse(frame: &[u8]) -> Option<SseFrame> {
    let text = std::str::from_utf8(frame).ok()?;
    let mut out = SseFrame::default();
    let mut has_data = false;
    for line in lines(text) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = split_field(line);
        match field {
            "data" => {
                if has_data {
                    out.data.push('\n');
                }
                out.data.push_str(value);
                has_data = true;
            }
            "event" => out.event = Some(value.to_owned()),
            "id" => out.id = Some(value.to_owned()),
            _ => {}
        }
    }
    has_data.then_some(out)
}

/// A [`Framer`] that yields decoded frames, for readers that do not relay the bytes.
#[derive(Debug)]
pub struct SseDecoder {
    framer: Framer,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new()
    }
}

impl SseDecoder {
    /// Largest frame decoded; the runtime's events are far smaller. Past it the stream is not
    /// decoded any more (the oracle then relies on its reads, which it re-does anyway).
    const MAX_FRAME: usize = 16 * 1024 * 1024;

    pub fn new() -> SseDecoder {
        SseDecoder {
            framer: Framer::new(Self::MAX_FRAME),
        }
    }

    /// Adds `chunk` and returns every frame completed by it, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseFrame> {
        self.framer
            .push(chunk)
            .into_iter()
            .filter_map(|c| match c {
                Chunk::Frame(frame) => parse(&frame),
                Chunk::Raw(_) => None,
            })
            .collect()
    }
}

/// Rebuilds `frame` with its data replaced by `data` (one `data:` line per line of `data`),
/// keeping every other line (`id:`, `event:`, comments) where it was.
pub fn replace_data(frame: &[u8], data: &str) -> Bytes {
    let text = String::from_utf8_lossy(frame);
    let mut out = String::with_capacity(frame.len() + data.len());
    let mut wrote = false;
    for line in lines(&text) {
        if line.is_empty() {
            continue;
        }
        if split_field(line).0 == "data" {
            if !wrote {
                for d in data.split('\n') {
                    out.push_str("data: ");
                    out.push_str(d);
                    out.push('\n');
                }
                wrote = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !wrote {
        for d in data.split('\n') {
            out.push_str("data: ");
            out.push_str(d);
            out.push('\n');
        }
    }
    out.push('\n');
    Bytes::from(out)
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').flat_map(|l| l.split('\r'))
}

fn split_field(line: &str) -> (&str, &str) {
    match line.split_once(':') {
        Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for part in input {
            for c in f.push(part) {
                match c {
                    Chunk::Frame(b) | Chunk::Raw(b) => out.push(b.to_vec()),
                }
            }
        }
        if let Some(rest) = f.finish() {
            out.push(rest.to_vec());
        }
        out
    }

    #[test]
    fn frames_are_split_on_blank_lines_with_every_line_ending() {
        let input = b"data: a\n\ndata: b\r\n\r\n: comment\rdata: c\r\rdata: d\n\r\n";
        let got = frames(&[input]);
        assert_eq!(
            got,
            vec![
                b"data: a\n\n".to_vec(),
                b"data: b\r\n\r\n".to_vec(),
                b": comment\rdata: c\r\r".to_vec(),
                b"data: d\n\r\n".to_vec(),
            ]
        );
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_frames() {
        let input: &[u8] = b"id: 1\ndata: {\"a\":1}\n\n: hb\n\ndata: x\r\n\r\ndata: y\r\rtail";
        let whole = frames(&[input]);
        assert_eq!(whole.concat(), input, "identity");
        for cut in 0..input.len() {
            for cut2 in cut..input.len() {
                let got = frames(&[&input[..cut], &input[cut..cut2], &input[cut2..]]);
                assert_eq!(got, whole, "split at {cut},{cut2}");
            }
        }
    }

    #[test]
    fn a_byte_at_a_time_gives_the_same_frames() {
        let input: &[u8] = b"data: a\r\n\r\ndata: b\r\rdata: c\n\n";
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(frames(&bytes), frames(&[input]));
    }

    #[test]
    fn an_oversized_frame_turns_the_stream_raw_without_losing_bytes() {
        let mut f = Framer::new(16);
        let mut out = Vec::new();
        for part in [&b"data: 0123456789abcdef"[..], b"ghij\n\n", b"data: z\n\n"] {
            for c in f.push(part) {
                match c {
                    Chunk::Frame(b) => out.push(("frame", b.to_vec())),
                    Chunk::Raw(b) => out.push(("raw", b.to_vec())),
                }
            }
        }
        assert!(f.is_raw());
        let all: Vec<u8> = out.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(all, b"data: 0123456789abcdefghij\n\ndata: z\n\n");
        assert!(out.iter().all(|(k, _)| *k == "raw"));
    }

    #[test]
    fn data_lines_are_joined_and_replaced_in_place() {
        let frame = b"id: evt_1\ndata: {\"a\":\ndata: 1}\n: note\n\n";
        assert_eq!(parse(frame).unwrap().data, "{\"a\":\n1}");
        let out = replace_data(frame, "{\"b\":2}");
        assert_eq!(&out[..], b"id: evt_1\ndata: {\"b\":2}\n: note\n\n");
        assert_eq!(parse(b": only a comment\n\n"), None);
        assert_eq!(parse(b"data:x\n\n").unwrap().data, "x");
    }

    #[test]
    fn frames_survive_any_split() {
        let stream = "id: evt_1\r\ndata: {\"type\":\"a\",\"t\":\"é\"}\r\n\r\n: comment\n\ndata: x\ndata: y\n\n";
        let bytes = stream.as_bytes();
        let whole = SseDecoder::new().push(bytes);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].id.as_deref(), Some("evt_1"));
        assert_eq!(whole[0].data, "{\"type\":\"a\",\"t\":\"é\"}");
        assert_eq!(whole[1].data, "x\ny");
        for cut in 0..bytes.len() {
            let mut d = SseDecoder::new();
            let mut got = d.push(&bytes[..cut]);
            got.extend(d.push(&bytes[cut..]));
            assert_eq!(got, whole, "split at {cut}");
        }
        // Byte by byte.
        let mut d = SseDecoder::new();
        let got: Vec<_> = bytes.iter().flat_map(|b| d.push(&[*b])).collect();
        assert_eq!(got, whole);
    }
}
