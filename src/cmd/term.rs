//! Drawing a frame in place on a terminal (`taskgate wait`, `taskgate holds`): every line is
//! cut to the terminal's width and the frame to its height, so the next redraw moves the cursor
//! up over exactly the rows the last one took. A line longer than the terminal wraps onto a
//! second row the cursor-up does not count, and each redraw then leaves the top of the old
//! frame behind; so does a frame taller than the screen, whose top has scrolled away.

use std::io::Write;

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// The size assumed when the terminal does not say (a pipe never draws live).
const FALLBACK: (usize, usize) = (80, 24);

/// Columns and rows of the terminal on stdout.
pub fn size() -> (usize, usize) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ only writes a `winsize` into the pointer it is given, which points to
    // one that lives across the call.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if !ok || size.ws_col == 0 || size.ws_row == 0 {
        return FALLBACK;
    }
    (usize::from(size.ws_col), usize::from(size.ws_row))
}

/// `line` cut to at most `width` columns, an ellipsis marking the cut. Wide characters
/// (CJK, emoji) count as two columns; control characters are dropped (a title could carry one).
pub fn fit(line: &str, width: usize) -> String {
    let clean: String = line.chars().filter(|c| !c.is_control()).collect();
    if clean.width() <= width {
        return clean;
    }
    let mut out = String::new();
    let mut used = 0;
    for c in clean.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    if width > 0 {
        out.push('…');
    }
    out
}

/// A frame redrawn in place; remembers how many rows it took.
#[derive(Default)]
pub struct Frame {
    rows: usize,
}

impl Frame {
    /// The escape sequence and text that replace the last frame with `text`, for a terminal
    /// of `width` × `height`. Pure, so the arithmetic is tested without a terminal.
    pub fn render(&mut self, text: &str, (width, height): (usize, usize)) -> String {
        let mut out = self.erase();
        // One row is left for the cursor, so the frame never scrolls the screen.
        let room = height.saturating_sub(1).max(1);
        let lines: Vec<&str> = text.lines().collect();
        let (shown, hidden) = if lines.len() > room {
            (&lines[..room - 1], lines.len() - (room - 1))
        } else {
            (&lines[..], 0)
        };
        for line in shown {
            out.push_str(&fit(line, width));
            out.push('\n');
        }
        if hidden > 0 {
            out.push_str(&fit(&format!("… {hidden} more lines"), width));
            out.push('\n');
        }
        self.rows = shown.len() + usize::from(hidden > 0);
        out
    }

    /// Cursor up over the last frame, and clear from there to the end of the screen.
    fn erase(&mut self) -> String {
        let rows = std::mem::take(&mut self.rows);
        if rows == 0 {
            String::new()
        } else {
            format!("\x1b[{rows}A\x1b[J")
        }
    }

    /// Draws `text` on stdout in place of the last frame.
    pub fn draw(&mut self, text: &str) {
        let bytes = self.render(text, size());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes.as_bytes()).and_then(|()| out.flush());
    }

    /// Erases the last frame from stdout.
    pub fn clear(&mut self) {
        let bytes = self.erase();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes.as_bytes()).and_then(|()| out.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_cut_to_the_width_counting_wide_characters_twice() {
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("exactly10!", 10), "exactly10!");
        assert_eq!(fit("ses_0123456789 is busy", 10), "ses_01234…");
        assert_eq!(fit("子セッション忙しい", 7), "子セッ…");
        assert!(fit("子セッション忙しい", 7).width() <= 7);
        assert_eq!(fit("a\tb\x1b[2Jc", 10), "ab[2Jc");
    }

    /// The bug this pins: `taskgate wait` on a narrow terminal counted the lines it drew, not
    /// the rows they wrapped onto, and left broken frames behind on every redraw.
    #[test]
    fn a_redraw_on_a_narrow_terminal_erases_exactly_the_rows_it_drew() {
        let mut frame = Frame::default();
        let text = "ses_dd1c72955ffblRpQzYrdXQLuoH is busy  (12s)\n  └ ses_child general idle 3s child job (@general subagent)\n";
        let first = frame.render(text, (30, 24));
        assert!(!first.contains('\x1b'), "nothing to erase yet: {first:?}");
        for row in first.lines() {
            assert!(row.width() <= 30, "{row:?} is wider than the terminal");
        }
        let second = frame.render(text, (30, 24));
        assert!(second.starts_with("\x1b[2A\x1b[J"), "{second:?}");
        frame.render("", (30, 24));
        assert_eq!(frame.erase(), "");
    }

    #[test]
    fn a_frame_taller_than_the_screen_is_cut_and_says_so() {
        let mut frame = Frame::default();
        let text: String = (0..30).map(|n| format!("line {n}\n")).collect();
        let drawn = frame.render(&text, (40, 10));
        let rows: Vec<&str> = drawn.lines().collect();
        assert_eq!(rows.len(), 9, "{drawn}");
        assert_eq!(rows[8], "… 22 more lines");
        assert!(frame.render("x", (40, 10)).starts_with("\x1b[9A"));
    }
}
