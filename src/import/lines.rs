//! JSON lines as records: one `POST /connections` body per line.

use std::io::{self, BufRead, Read};

use serde_json::Value;

use super::{LineFault, MAX_LINE, Record, Source};

/// The records of a JSON-lines reader.
pub struct JsonLines<R>(Lines<R>);

impl<R: BufRead> JsonLines<R> {
    pub fn new(input: R) -> Self {
        Self(Lines::new(input))
    }
}

impl<R: BufRead> Source for JsonLines<R> {
    async fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        let Some((number, line)) = self.0.next_line()? else {
            return Ok(None);
        };
        let body = line.and_then(|bytes| {
            serde_json::from_slice::<Value>(bytes).map_err(|e| LineFault {
                code: "invalid_json",
                message: format!("not valid JSON: {e}"),
            })
        });
        Ok(Some(Record {
            at: format!("line {number}"),
            number,
            body,
        }))
    }
}

/// The lines of a reader, numbered from 1, blank ones skipped; a line longer than
/// [`MAX_LINE`] or not UTF-8 is a fault of that line, and reading goes on after it.
struct Lines<R> {
    input: R,
    buffer: Vec<u8>,
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(input: R) -> Self {
        Self {
            input,
            buffer: Vec::new(),
            number: 0,
        }
    }

    /// The next non-blank line, or `None` at the end.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> io::Result<Option<(u64, Result<&[u8], LineFault>)>> {
        let (start, end) = loop {
            self.buffer.clear();
            // Room for a line of `MAX_LINE` bytes and its CR LF.
            let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 2;
            let read = (&mut self.input)
                .take(limit)
                .read_until(b'\n', &mut self.buffer)?;
            if read == 0 {
                return Ok(None);
            }
            self.number += 1;
            let ending = match self.buffer.as_slice() {
                [.., b'\r', b'\n'] => 2,
                [.., b'\n'] => 1,
                _ => 0,
            };
            if self.buffer.len() - ending > MAX_LINE {
                // Skip the rest of the line, a chunk at a time.
                let mut ended = ending > 0;
                while !ended {
                    self.buffer.clear();
                    let more = (&mut self.input)
                        .take(limit)
                        .read_until(b'\n', &mut self.buffer)?;
                    ended = more == 0 || self.buffer.last() == Some(&b'\n');
                }
                return Ok(Some((
                    self.number,
                    Err(LineFault {
                        code: "line_too_long",
                        message: format!("longer than {MAX_LINE} bytes (the API's body limit)"),
                    }),
                )));
            }
            // A byte order mark (what some editors on Windows write first) is not content.
            let bom = match self.number == 1 && self.buffer.starts_with(b"\xEF\xBB\xBF") {
                true => 3,
                false => 0,
            };
            let unmarked = self.buffer.get(bom..).unwrap_or_default();
            let start = bom + unmarked.len() - unmarked.trim_ascii_start().len();
            let end = self.buffer.trim_ascii_end().len();
            if start >= end {
                continue;
            }
            if std::str::from_utf8(self.buffer.get(start..end).unwrap_or_default()).is_err() {
                return Ok(Some((
                    self.number,
                    Err(LineFault {
                        code: "invalid_json",
                        message: "not UTF-8".into(),
                    }),
                )));
            }
            break (start, end);
        };
        let line = self.buffer.get(start..end).unwrap_or_default();
        Ok(Some((self.number, Ok(line))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lines(text: &[u8]) -> Vec<(u64, Result<String, &'static str>)> {
        let mut lines = Lines::new(text);
        let mut out = Vec::new();
        while let Some((n, line)) = lines.next_line().unwrap() {
            out.push((
                n,
                line.map(|b| String::from_utf8_lossy(b).into_owned())
                    .map_err(|f| f.code),
            ));
        }
        out
    }

    #[test]
    fn lines_are_numbered_from_one_and_blank_ones_are_skipped() {
        assert_eq!(
            lines(b"{}\n\n  \r\n{\"a\":1}\r\n{}"),
            vec![
                (1, Ok("{}".into())),
                (4, Ok("{\"a\":1}".into())),
                (5, Ok("{}".into()))
            ]
        );
    }

    #[test]
    fn an_overlong_or_binary_line_is_a_fault_and_reading_goes_on() {
        let mut text = vec![b'x'; MAX_LINE * 2 + 7];
        text.extend_from_slice(b"\n{}\n\xff\xfe\n{}");
        assert_eq!(
            lines(&text),
            vec![
                (1, Err("line_too_long")),
                (2, Ok("{}".into())),
                (3, Err("invalid_json")),
                (4, Ok("{}".into()))
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_taken() {
        let mut text = vec![b' '; MAX_LINE - 2];
        text.extend_from_slice(b"{}\n");
        assert_eq!(lines(&text), vec![(1, Ok("{}".into()))]);
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_is_skipped() {
        assert_eq!(
            lines(b"\xEF\xBB\xBF{}\n\xEF\xBB\xBF{}"),
            // Only there: elsewhere it stays, and the line is not JSON.
            vec![(1, Ok("{}".into())), (2, Ok("\u{feff}{}".into()))]
        );
    }

    #[test]
    fn the_limit_counts_neither_a_cr_lf_nor_an_lf() {
        let mut text = vec![b' '; MAX_LINE - 2];
        text.extend_from_slice(b"{}\r\n");
        text.extend(vec![b' '; MAX_LINE - 1]);
        text.extend_from_slice(b"{}\r\n{}");
        assert_eq!(
            lines(&text),
            vec![
                (1, Ok("{}".into())),
                (2, Err("line_too_long")),
                (3, Ok("{}".into()))
            ]
        );
    }
}
