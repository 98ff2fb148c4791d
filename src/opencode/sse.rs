//! An incremental Server-Sent-Events decoder.
//!
//! The network splits an event stream wherever it likes: in the middle of a line, between the
//! `\r` and `\n` of a line ending, inside a multi-byte UTF-8 character. The decoder buffers
//! bytes until a frame's blank line arrives and only then decodes, so no split can corrupt an
//! event.

/// One complete SSE frame (an "event" in the SSE spec; named frame here so it is not confused
/// with a runtime [`super::Event`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// `event:` field, when sent.
    pub event: Option<String>,
    /// `id:` field, when sent.
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Feed it chunks as they arrive; it returns the frames each chunk completed.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
    current: SseFrame,
    has_data: bool,
}

impl SseDecoder {
    pub fn new() -> SseDecoder {
        SseDecoder::default()
    }

    /// Adds `chunk` and returns every frame completed by it, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseFrame> {
        self.buffer.extend_from_slice(chunk);
        let mut frames = Vec::new();
        let mut start = 0;
        while let Some(rel) = self.buffer[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let end = start + rel;
            // A lone `\r` at the very end may be the first half of `\r\n`: wait for more.
            if self.buffer[end] == b'\r' && end + 1 == self.buffer.len() {
                break;
            }
            let line = String::from_utf8_lossy(&self.buffer[start..end]).into_owned();
            let crlf = self.buffer[end] == b'\r' && self.buffer.get(end + 1) == Some(&b'\n');
            start = end + if crlf { 2 } else { 1 };
            if let Some(frame) = self.line(&line) {
                frames.push(frame);
            }
        }
        self.buffer.drain(..start);
        frames
    }

    fn line(&mut self, line: &str) -> Option<SseFrame> {
        if line.is_empty() {
            let frame = std::mem::take(&mut self.current);
            let complete = std::mem::take(&mut self.has_data);
            return complete.then_some(frame);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.current.event = Some(value.to_owned()),
            "id" => self.current.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
