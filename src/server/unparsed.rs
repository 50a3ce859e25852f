//! JSON answers to requests hyper cannot parse.
//!
//! hyper answers a request head it cannot read (not HTTP/1.1, a malformed header, a URI or
//! headers past its limits) by itself, with an empty body, before the router sees anything.
//! The socket wrapper recognizes that answer by its fixed shape, when it is all hyper writes
//! (no request in progress, everything answered before flushed, so no bytes passed through
//! from elsewhere can be mistaken for it), and writes one with a JSON error body in its place,
//! so that every 4xx the service gives carries a code.

/// hyper's answers: its status (after `HTTP/1.1 ` or `HTTP/1.0 `), and what ours says instead.
const ANSWERS: [(&[u8], &str, &str); 3] = [
    (
        b"400 Bad Request",
        "invalid_request",
        "the request could not be read as HTTP/1.1",
    ),
    (
        b"414 URI Too Long",
        "uri_too_long",
        "the request's URI is longer than the server accepts",
    ),
    (
        b"431 Request Header Fields Too Large",
        "headers_too_large",
        "the request's headers are larger or more numerous than the server accepts",
    ),
];

/// What follows the status line in hyper's answer, up to its date: with `connection: close`,
/// or without (after requests answered on the same connection).
const BEFORE_DATE: [&[u8]; 2] = [
    b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
    b"\r\ncontent-length: 0\r\ndate: ",
];

/// An HTTP date (`Sat, 05 Dec 2026 05:38:55 GMT`) is this long.
const DATE_LENGTH: usize = 29;

/// The answer a refused connection (past the connection cap) reads before it is closed.
pub(super) const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\ncontent-length: 104\r\nconnection: close\r\n\r\n\
{\"error\":{\"code\":\"service_unavailable\",\"message\":\"the server has too many open connections; try again\"}}";

/// If `written` is hyper's own answer, whole, what to write in its place.
pub(super) fn hyper_answer(written: &[u8]) -> Option<Vec<u8>> {
    let version = written
        .get(..9)
        .filter(|v| *v == b"HTTP/1.1 " || *v == b"HTTP/1.0 ")?;
    let rest = &written[9..];
    ANSWERS.iter().find_map(|(status, code, message)| {
        let headers = rest.strip_prefix(*status)?;
        let date = BEFORE_DATE
            .iter()
            .find_map(|before| headers.strip_prefix(*before))?
            .strip_suffix(b"\r\n\r\n")
            .filter(|date| date.len() == DATE_LENGTH)?;
        Some(json_answer(version, status, code, message, date))
    })
}

fn json_answer(version: &[u8], status: &[u8], code: &str, message: &str, date: &[u8]) -> Vec<u8> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut answer = Vec::with_capacity(256);
    answer.extend_from_slice(version);
    answer.extend_from_slice(status);
    answer.extend_from_slice(b"\r\ncontent-type: application/json\r\nconnection: close\r\n");
    answer.extend_from_slice(format!("content-length: {}\r\ndate: ", body.len()).as_bytes());
    answer.extend_from_slice(date);
    answer.extend_from_slice(b"\r\n\r\n");
    answer.extend_from_slice(body.as_bytes());
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Sat, 05 Dec 2026 05:38:55 GMT";

    fn hypers(status: &str) -> String {
        format!("{status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n")
    }

    #[test]
    fn hypers_answer_without_connection_close_is_recognized_too() {
        let written = hypers("HTTP/1.1 400 Bad Request").replace("connection: close\r\n", "");
        let answer = hyper_answer(written.as_bytes()).unwrap_or_default();
        assert_eq!(body_of(&answer)["error"]["code"], "invalid_request");
    }

    fn body_of(answer: &[u8]) -> serde_json::Value {
        let text = String::from_utf8_lossy(answer);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(length, Some(body.len()), "{text}");
        serde_json::from_str(body).unwrap_or_default()
    }

    #[test]
    fn each_of_hypers_answers_becomes_a_json_error() {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            for (status, code) in [
                ("400 Bad Request", "invalid_request"),
                ("414 URI Too Long", "uri_too_long"),
                ("431 Request Header Fields Too Large", "headers_too_large"),
            ] {
                let status = format!("{version} {status}");
                let Some(answer) = hyper_answer(hypers(&status).as_bytes()) else {
                    panic!("{status} not recognized");
                };
                assert!(answer.starts_with(status.as_bytes()));
                assert!(String::from_utf8_lossy(&answer).contains(DATE));
                assert_eq!(body_of(&answer)["error"]["code"], code);
            }
        }
    }

    #[test]
    fn other_answers_are_left_alone() {
        let ours = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                    content-length: 2\r\ndate: Sat, 05 Dec 2026 05:38:55 GMT\r\n\r\n{}";
        for written in [
            ours.to_owned(),
            hypers("HTTP/1.1 200 OK"),
            hypers("HTTP/1.1 400 Bad Request") + "x",
            // Not alone: after an answer's bytes.
            format!("{{}}{}", hypers("HTTP/1.1 400 Bad Request")),
            hypers("HTTP/2.0 400 Bad Request"),
            hypers("HTTP/1.1 400 Bad Request").replace(DATE, "Sat, 5 Dec 2026"),
            String::new(),
            "\r\n\r\n".to_owned(),
        ] {
            assert!(hyper_answer(written.as_bytes()).is_none(), "{written}");
        }
    }

    #[test]
    fn the_busy_answer_says_its_length() {
        assert_eq!(body_of(BUSY)["error"]["code"], "service_unavailable");
    }
}
