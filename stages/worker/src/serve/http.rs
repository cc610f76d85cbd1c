//! The HTTP/1.1 transport of `flag serve`, on `std::net`: one thread per connection,
//! keep-alive, `Content-Length` and chunked request bodies, `Expect: 100-continue`. It owns
//! each connection's socket, which is what lets a request notice that its client went away
//! while the answer is decoded ([`Exchange::client_gone`]); tiny_http hides the socket.
//!
//! Limits: a request head of at most [`MAX_HEAD`] bytes (431 past it) arriving within
//! [`HEAD_TIMEOUT`], a body of at most `max_body` bytes (413 from its `Content-Length` before
//! reading it, or as soon as a chunked body passes it), a connection idle for [`IDLE`]
//! between requests is closed (at once when another client waits for a slot), and a body or
//! response that stalls for [`IO_TIMEOUT`] ends the connection. A request with two
//! `Content-Length` or `Transfer-Encoding` headers is refused (400).
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 64 << 10;
/// A keep-alive connection with no new request for this long is closed.
pub const IDLE: Duration = Duration::from_secs(120);
/// A body read or response write that makes no progress for this long ends the connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// A request head must arrive whole within this long of its first byte being awaited.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connection waiting for its next request looks whether the server is full.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// A request line and headers.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    /// The target without its query.
    pub path: String,
    /// HTTP/1.0 (false) or HTTP/1.1 (true).
    pub http11: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the headers named `name` (case-insensitive), in order.
    fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        let conn = self.header("Connection").unwrap_or("").to_ascii_lowercase();
        if self.http11 {
            conn.split(',').any(|t| t.trim() == "close")
        } else {
            !conn.split(',').any(|t| t.trim() == "keep-alive")
        }
    }
}

/// A response to write.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers (name, value).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Larger than the limit (413).
    TooLarge(u64),
    /// Malformed framing (400).
    Bad(String),
    /// The connection failed.
    Io(std::io::Error),
}

enum Framing {
    Length(u64),
    Chunked,
}

/// One request on a connection: its head, its body (read on demand), and a probe of the
/// client.
pub struct Exchange<'a> {
    pub head: Head,
    framing: Framing,
    /// The body was read to its end (so the connection can carry another request).
    body_done: bool,
    reader: &'a mut BufReader<TcpStream>,
    stream: &'a TcpStream,
    max_body: u64,
    /// The client was seen gone.
    gone: bool,
}

impl Exchange<'_> {
    /// The body's declared length (None for chunked bodies).
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        }
    }

    /// Reads the whole body (at most `max_body` bytes); sends `100 Continue` first when the
    /// client asked for it.
    pub fn read_body(&mut self) -> Result<Vec<u8>, BodyError> {
        if let Framing::Length(n) = self.framing
            && n > self.max_body
        {
            return Err(BodyError::TooLarge(n));
        }
        if self
            .head
            .header("Expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
            && self.head.http11
        {
            let mut w = self.stream;
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(BodyError::Io)?;
        }
        let body = match self.framing {
            Framing::Length(n) => {
                let mut body = Vec::with_capacity(n as usize);
                (&mut *self.reader)
                    .take(n)
                    .read_to_end(&mut body)
                    .map_err(BodyError::Io)?;
                if (body.len() as u64) < n {
                    return Err(BodyError::Io(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the connection closed inside the body",
                    )));
                }
                body
            }
            Framing::Chunked => read_chunked(self.reader, self.max_body)?,
        };
        self.body_done = true;
        Ok(body)
    }

    /// Whether the client has closed its side of the connection (or reset it). Looks at the
    /// socket without blocking or consuming anything: end of stream or a reset means gone;
    /// pending bytes (a pipelined request) or nothing to read mean still there. A client that
    /// only half-closes (shuts down its sending side while still reading) is taken as gone,
    /// as nginx does (its 499); HTTP clients do not do that.
    pub fn client_gone(&mut self) -> bool {
        if self.gone {
            return true;
        }
        if !self.reader.buffer().is_empty() {
            // A pipelined request already buffered: the client is there.
            return false;
        }
        // Only this thread uses the socket while the request is handled, so switching it to
        // non-blocking for one peek disturbs nothing.
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let r = self.stream.peek(&mut b);
        let _ = self.stream.set_nonblocking(false);
        self.gone = match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        };
        self.gone
    }
}

fn read_line(r: &mut BufReader<TcpStream>, budget: &mut usize) -> Result<Vec<u8>, BodyError> {
    read_line_by(r, budget, None)
}

/// One line (CRLF or LF, without it) of at most `budget` bytes, taken off `budget`; with a
/// `deadline`, the whole line must arrive by then (each read waits only for what is left),
/// so a client trickling bytes cannot hold a connection for long.
fn read_line_by(
    r: &mut BufReader<TcpStream>,
    budget: &mut usize,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, BodyError> {
    let mut line = Vec::new();
    loop {
        if let Some(d) = deadline
            && r.buffer().is_empty()
        {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() || r.get_ref().set_read_timeout(Some(left)).is_err() {
                return Err(BodyError::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "the request head took too long",
                )));
            }
        }
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(BodyError::Io(e)),
        };
        if buf.is_empty() {
            return Err(BodyError::Io(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the connection closed inside a line",
            )));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > *budget {
            return Err(BodyError::Bad("a line is too long".into()));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            break;
        }
    }
    *budget -= line.len();
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(line)
}

/// Decodes a chunked body of at most `max` bytes (trailers skipped).
fn read_chunked(r: &mut BufReader<TcpStream>, max: u64) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    loop {
        let mut budget = 1024;
        let line = read_line(r, &mut budget)?;
        let size = std::str::from_utf8(&line)
            .ok()
            .map(|l| l.split(';').next().unwrap_or("").trim())
            .filter(|s| !s.is_empty() && s.len() <= 16)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| BodyError::Bad("a malformed chunk size".into()))?;
        if size == 0 {
            // Trailers, up to the empty line.
            let mut budget = MAX_HEAD;
            while !read_line(r, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() as u64 + size > max {
            return Err(BodyError::TooLarge(body.len() as u64 + size));
        }
        let start = body.len();
        (&mut *r)
            .take(size)
            .read_to_end(&mut body)
            .map_err(BodyError::Io)?;
        if (body.len() - start) as u64 != size {
            return Err(BodyError::Io(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the connection closed inside a chunk",
            )));
        }
        let mut budget = 2;
        if !read_line(r, &mut budget)?.is_empty() {
            return Err(BodyError::Bad("a chunk is longer than its size".into()));
        }
    }
}

/// What went wrong with a request head.
enum HeadError {
    /// The connection closed (or idled out) before a request began: close quietly.
    Closed,
    /// Answer with this status and message, then close.
    Reject(u16, String),
}

fn read_head(r: &mut BufReader<TcpStream>) -> Result<Head, HeadError> {
    let mut budget = MAX_HEAD;
    let deadline = Some(Instant::now() + HEAD_TIMEOUT);
    let too_large = || HeadError::Reject(431, format!("the request head exceeds {MAX_HEAD} bytes"));
    // Blank lines before a request line are allowed (RFC 9112 2.2).
    let line = loop {
        match read_line_by(r, &mut budget, deadline) {
            Ok(l) if l.is_empty() => continue,
            Ok(l) => break l,
            Err(BodyError::Bad(_)) => return Err(too_large()),
            Err(_) => return Err(HeadError::Closed),
        }
    };
    let bad = |m: &str| HeadError::Reject(400, m.to_string());
    let line = String::from_utf8(line).map_err(|_| bad("the request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("a malformed request line"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => {
            return Err(HeadError::Reject(
                505,
                format!("{version} is not supported (HTTP/1.0 and 1.1 are)"),
            ));
        }
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("a malformed request method"));
    }
    let mut headers = Vec::new();
    loop {
        let line = match read_line_by(r, &mut budget, deadline) {
            Ok(l) => l,
            Err(BodyError::Bad(_)) => return Err(too_large()),
            Err(_) => return Err(HeadError::Closed),
        };
        if line.is_empty() {
            break;
        }
        if headers.len() >= 100 {
            return Err(HeadError::Reject(431, "more than 100 headers".into()));
        }
        let line = String::from_utf8(line).map_err(|_| bad("a header is not UTF-8"))?;
        if line.starts_with([' ', '\t']) {
            return Err(bad("folded header lines are not supported"));
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad("a header without ':'"))?;
        if k.is_empty() || k.ends_with([' ', '\t']) {
            return Err(bad("a malformed header name"));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    Ok(Head {
        method: method.to_string(),
        path,
        http11,
        headers,
    })
}

fn framing(head: &Head) -> Result<Framing, String> {
    // More than one framing header, or a list in one, is refused: a proxy in front that
    // reads another of them than this server does would see another request boundary
    // (request smuggling, RFC 9112 6.3).
    for name in ["Transfer-Encoding", "Content-Length"] {
        let values: Vec<&str> = head.headers_named(name).collect();
        if values.len() > 1 {
            return Err(format!(
                "a request with {} {name} headers ({}) is ambiguous",
                values.len(),
                values.join(" / ")
            ));
        }
    }
    let te = head.header("Transfer-Encoding");
    let cl = head.header("Content-Length");
    match (te, cl) {
        (Some(_), Some(_)) => {
            Err("a request with both Transfer-Encoding and Content-Length is ambiguous".into())
        }
        (Some(te), None) if te.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
        (Some(te), None) => Err(format!(
            "Transfer-Encoding '{te}' is not supported (only chunked)"
        )),
        (None, Some(cl)) => cl
            .parse::<u64>()
            .ok()
            .filter(|_| cl.bytes().all(|b| b.is_ascii_digit()))
            .map(Framing::Length)
            .ok_or_else(|| format!("Content-Length '{cl}' is not a byte count")),
        (None, None) => Ok(Framing::Length(0)),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes `resp`; `close` adds `Connection: close`. HEAD gets the headers only.
pub fn write_response(
    mut w: &TcpStream,
    resp: &Response,
    close: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&resp.body);
    }
    w.write_all(&bytes)?;
    w.flush()
}

fn error_json(status: u16, message: &str) -> Response {
    Response::json(
        status,
        &flag_llm::protocol::ApiError::with_status(status, message).body(),
    )
}

/// Serves the requests of one connection until it closes. `handle` answers each request;
/// a response with status 499 means the client went away: nothing is written and the
/// connection is closed. A request whose body `handle` did not read ends the connection
/// after its response (the unread bytes cannot be skipped safely).
///
/// `wanted` is asked while the connection is idle between requests (or has sent nothing
/// yet): true means another client waits for a slot and this connection gives it up (the
/// call claims that), so idle keep-alive connections cannot lock the server out; one inside
/// a request head has [`HEAD_TIMEOUT`].
pub fn serve_connection(
    stream: TcpStream,
    max_body: u64,
    wanted: &dyn Fn() -> bool,
    handle: &dyn Fn(&mut Exchange) -> Response,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(8 << 10, read_half);
    loop {
        if !await_request(&stream, &mut reader, wanted) {
            return;
        }
        let head = match read_head(&mut reader) {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::Reject(status, msg)) => {
                reject(&stream, &mut reader, status, &msg);
                return;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let framing = match framing(&head) {
            Ok(f) => f,
            Err(msg) => {
                reject(&stream, &mut reader, 400, &msg);
                return;
            }
        };
        let close = head.wants_close();
        let head_only = head.method == "HEAD";
        let mut ex = Exchange {
            body_done: matches!(framing, Framing::Length(0)),
            head,
            framing,
            reader: &mut reader,
            stream: &stream,
            max_body,
            gone: false,
        };
        let resp = handle(&mut ex);
        if resp.status == 499 || ex.gone {
            return;
        }
        let body_done = ex.body_done;
        let close = close || !body_done;
        let written = write_response(&stream, &resp, close, head_only);
        if written.is_ok() && !body_done {
            linger(&stream, &mut reader);
        }
        if written.is_err() || close {
            return;
        }
    }
}

/// Answers a request that cannot be served and closes its connection, reading what the
/// client still sends first so the answer is not lost to a reset.
fn reject(stream: &TcpStream, reader: &mut BufReader<TcpStream>, status: u16, msg: &str) {
    if write_response(stream, &error_json(status, msg), true, false).is_ok() {
        linger(stream, reader);
    }
}

/// Waits for the first byte of the next request: false when the client closed, the
/// connection stayed idle for [`IDLE`], or `wanted` claimed its slot for another client.
fn await_request(
    stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    wanted: &dyn Fn() -> bool,
) -> bool {
    let since = Instant::now();
    while reader.buffer().is_empty() {
        let left = IDLE.saturating_sub(since.elapsed());
        if left.is_zero() || stream.set_read_timeout(Some(left.min(IDLE_POLL))).is_err() {
            return false;
        }
        match reader.fill_buf() {
            Ok([]) => return false,
            Ok(_) => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if wanted() {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// After answering a request whose body was not read (413, 503, 401 ...): stop sending,
/// then read and discard what the client is still sending (at most [`LINGER_BYTES`], each
/// read waiting at most [`LINGER_WAIT`]) before closing, so closing with unread bytes does
/// not reset the connection and lose the answer before the client reads it (what nginx
/// calls a lingering close).
fn linger(stream: &TcpStream, reader: &mut BufReader<TcpStream>) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER_WAIT));
    let _ = std::io::copy(&mut reader.take(LINGER_BYTES), &mut std::io::sink());
}

/// Most bytes of an unread body discarded before closing.
const LINGER_BYTES: u64 = 64 << 20;
/// Longest wait for more of an unread body.
const LINGER_WAIT: Duration = Duration::from_secs(2);
