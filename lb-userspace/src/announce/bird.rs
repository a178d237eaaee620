//! BIRD 2, as xdplb uses it: the routes file it writes (two static
//! protocols that bird.conf includes) and `configure` over BIRD's control
//! socket, spoken directly.
//!
//! The control protocol (BIRD's doc/reply_codes): BIRD greets with
//! `0001 BIRD 2.0.12 ready.`, and every reply is lines of `DDDD-text` (more
//! follow), ` text` (more text of the line before) and a last `DDDD text`.
//! Codes 0xxx are success, 1xxx/2xxx data, 8xxx/9xxx errors (8002: the
//! configuration has an error, and says where as `FILE:LINE:COLUMN`).

use std::{collections::BTreeMap, fmt::Write as _, io, net::IpAddr, path::Path, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use super::Decision;

/// The static protocols the routes file defines; bird.conf exports them to
/// its BGP peers with `export where proto = "xdplb_vips4";` (and 6).
pub const PROTOCOL_V4: &str = "xdplb_vips4";
pub const PROTOCOL_V6: &str = "xdplb_vips6";

/// Each step with BIRD (connect, greeting, the reply to `configure`) gets this long.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// More than any reply to `configure` holds: a peer that sends more is not BIRD.
const REPLY_LIMIT: u64 = 1 << 20;

/// An address's host route: `198.18.0.10/32`, `2001:db8::10/128`.
pub fn prefix(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The routes file: both protocols, always (an empty static protocol is
/// valid, so bird.conf's `export where proto = ...` always names something
/// that exists), each with a blackhole route per address announced. The
/// route only carries the announcement: BIRD has no kernel protocol
/// exporting it here, and the dataplane answers the VIP before any route.
pub fn routes_file_text(routes: &BTreeMap<IpAddr, Decision>) -> String {
    let mut o = String::from("# Written by xdplb (do not edit): the VIP addresses this node announces.\n");
    for (name, family, v4) in [(PROTOCOL_V4, "ipv4", true), (PROTOCOL_V6, "ipv6", false)] {
        let _ = writeln!(o, "protocol static {name} {{\n  {family};");
        for (addr, _) in routes.iter().filter(|(a, d)| d.announce && a.is_ipv4() == v4) {
            let _ = writeln!(o, "  route {} blackhole;", prefix(*addr));
        }
        o.push_str("}\n");
    }
    o
}

/// One reply: the code of its last line, and every line's code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    /// The text of the last line and of the lines before it with its code
    /// (an error is often several lines of one code).
    pub fn message(&self) -> String {
        let texts: Vec<&str> =
            self.lines.iter().filter(|(c, t)| *c == self.code && !t.is_empty()).map(|(_, t)| t.as_str()).collect();
        texts.join(" ")
    }
}

/// Reads a reply line by line.
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<(u16, String)>,
}

impl ReplyParser {
    /// Takes one line (without its newline): the whole reply once its last
    /// line came, or what is wrong with the line.
    pub fn line(&mut self, line: &str) -> Result<Option<Reply>, String> {
        let b = line.as_bytes();
        if let Some(text) = line.strip_prefix(' ') {
            let Some(&(code, _)) = self.lines.last() else {
                return Err(format!("a reply began with a continuation line: {line:?}"));
            };
            self.lines.push((code, text.to_string()));
            return Ok(None);
        }
        if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) || !matches!(b.get(4), None | Some(b' ' | b'-')) {
            return Err(format!("not a line of BIRD's control protocol: {line:?}"));
        }
        let code: u16 = line[..4].parse().map_err(|_| format!("bad reply code in {line:?}"))?;
        self.lines.push((code, line.get(5..).unwrap_or("").to_string()));
        if b.get(4) == Some(&b'-') {
            return Ok(None);
        }
        Ok(Some(Reply { code, lines: std::mem::take(&mut self.lines) }))
    }
}

/// How `configure` went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigureError {
    /// BIRD could not be asked (not running, no permission, not answering):
    /// the sentence to show.
    Unreachable(String),
    /// BIRD answered, and refused: its own words.
    Refused(String),
}

/// Whether a reply to `configure` means BIRD took the new configuration:
/// 0003 Reconfigured, 0004 Reconfiguration in progress (protocols restart in
/// the background), 0005 already in progress, queueing (the new file is
/// parsed and applied next). Anything else is a refusal: 8002 the
/// configuration's error, 0006 shutting down, 0016 access restricted (a
/// socket opened with `bird -R`).
pub fn configure_outcome(reply: &Reply) -> Result<(), String> {
    match reply.code {
        3..=5 => Ok(()),
        code => {
            let message = reply.message();
            Err(if message.is_empty() { format!("reply code {code:04}") } else { message })
        }
    }
}

/// An I/O error's words without `(os error N)`.
fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => {
            let s = e.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_string()
        }
    }
}

/// What to say when `socket` cannot be connected to.
pub fn unreachable_text(socket: &Path, e: &io::Error) -> String {
    let fix = match e.kind() {
        // Under systemd xdplb has no CAP_DAC_OVERRIDE: bird.ctl is bird:bird 0660.
        io::ErrorKind::PermissionDenied => ": add SupplementaryGroups=bird to xdplb.service".to_string(),
        _ => " (is BIRD running? systemctl start bird)".to_string(),
    };
    format!("cannot reach BIRD at {}: {}{fix}", socket.display(), io_text(e))
}

/// What to say when BIRD refused the configuration with `error`, its own
/// words (`FILE:LINE:COLUMN message`), the routes file being `routes_file`.
pub fn refusal_text(error: &str, routes_file: &Path) -> String {
    let file = routes_file.display().to_string();
    let fix = if error.starts_with(&format!("{file}:")) {
        format!(
            "the error is in xdplb's routes file: does another file bird.conf includes define {PROTOCOL_V4} or \
             {PROTOCOL_V6} too?"
        )
    } else if error.ends_with("Permission denied")
        && routes_file.parent().is_some_and(|dir| error.contains(&dir.display().to_string()))
    {
        format!("BIRD runs as user bird: the file is 0644, so a directory above it keeps BIRD out (`namei -l {file}`)")
    } else {
        format!("the routes file {file} stays; fix bird.conf,")
    };
    format!("BIRD refused the new routes: {error} ({fix} xdplb retries every second)")
}

/// Reads one whole reply, within `STEP_TIMEOUT`.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, socket: &Path) -> Result<Reply, ConfigureError> {
    let read = async {
        let mut parser = ReplyParser::default();
        let mut line = String::new();
        loop {
            line.clear();
            let n = r.read_line(&mut line).await.map_err(|e| {
                ConfigureError::Unreachable(format!(
                    "reading from BIRD at {} failed: {}",
                    socket.display(),
                    io_text(&e)
                ))
            })?;
            if n == 0 {
                return Err(ConfigureError::Unreachable(format!(
                    "BIRD at {} closed the connection before answering",
                    socket.display()
                )));
            }
            let text = line.trim_end_matches(['\n', '\r']);
            match parser.line(text) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => {
                    return Err(ConfigureError::Unreachable(format!(
                        "{} does not speak BIRD's control protocol: {e}",
                        socket.display()
                    )));
                }
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, read).await.unwrap_or_else(|_| {
        Err(ConfigureError::Unreachable(format!(
            "BIRD at {} did not answer within {}s (is it stuck? `birdc -s {} show status`)",
            socket.display(),
            STEP_TIMEOUT.as_secs(),
            socket.display()
        )))
    })
}

/// Asks the BIRD at `socket` to read its configuration again (`birdc configure`).
pub async fn configure(socket: &Path) -> Result<(), ConfigureError> {
    let stream = match tokio::time::timeout(STEP_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConfigureError::Unreachable(unreachable_text(socket, &e))),
        Err(_) => {
            return Err(ConfigureError::Unreachable(format!(
                "cannot reach BIRD at {}: no answer within {}s",
                socket.display(),
                STEP_TIMEOUT.as_secs()
            )));
        }
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read.take(REPLY_LIMIT));
    let greeting = read_reply(&mut read, socket).await?;
    if greeting.code != 1 {
        return Err(ConfigureError::Unreachable(format!(
            "BIRD at {} greeted with {:04} {} instead of 0001 ... ready",
            socket.display(),
            greeting.code,
            greeting.message()
        )));
    }
    let sent = tokio::time::timeout(STEP_TIMEOUT, write.write_all(b"configure\n")).await;
    if let Ok(Err(e)) = sent {
        return Err(ConfigureError::Unreachable(format!(
            "writing to BIRD at {} failed: {}",
            socket.display(),
            io_text(&e)
        )));
    } else if sent.is_err() {
        return Err(ConfigureError::Unreachable(format!("BIRD at {} takes no command", socket.display())));
    }
    let reply = read_reply(&mut read, socket).await?;
    configure_outcome(&reply).map_err(ConfigureError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(parser: &mut ReplyParser, text: &str) -> Vec<Result<Option<Reply>, String>> {
        text.lines().map(|l| parser.line(l)).collect()
    }

    #[test]
    fn the_routes_file_defines_both_protocols_with_the_announced_addresses_only() {
        let mut routes = BTreeMap::new();
        let up = Decision { announce: true, why: super::super::WHY_HEALTHY };
        let down = Decision { announce: false, why: super::super::WHY_NO_BACKEND };
        routes.insert("198.18.0.10".parse().unwrap(), up);
        routes.insert("198.18.0.11".parse().unwrap(), down);
        routes.insert("2001:db8::10".parse().unwrap(), up);
        assert_eq!(
            routes_file_text(&routes),
            "# Written by xdplb (do not edit): the VIP addresses this node announces.\n\
             protocol static xdplb_vips4 {\n  ipv4;\n  route 198.18.0.10/32 blackhole;\n}\n\
             protocol static xdplb_vips6 {\n  ipv6;\n  route 2001:db8::10/128 blackhole;\n}\n"
        );
        assert_eq!(
            routes_file_text(&BTreeMap::new()),
            "# Written by xdplb (do not edit): the VIP addresses this node announces.\n\
             protocol static xdplb_vips4 {\n  ipv4;\n}\nprotocol static xdplb_vips6 {\n  ipv6;\n}\n",
            "both protocols stay, empty, when nothing is announced"
        );
    }

    #[test]
    fn a_reply_ends_with_its_first_line_without_a_dash() {
        let mut p = ReplyParser::default();
        assert_eq!(
            p.line("0001 BIRD 2.0.12 ready."),
            Ok(Some(Reply { code: 1, lines: vec![(1, "BIRD 2.0.12 ready.".into())] }))
        );
        let got = lines(&mut p, "0002-Reading configuration from /etc/bird/bird.conf\n0003 Reconfigured");
        assert_eq!(got[0], Ok(None));
        let reply = got[1].clone().unwrap().unwrap();
        assert_eq!(reply.code, 3);
        assert_eq!(reply.lines[0], (2, "Reading configuration from /etc/bird/bird.conf".into()));
        assert_eq!(configure_outcome(&reply), Ok(()));
    }

    #[test]
    fn continuation_lines_belong_to_the_code_before_them() {
        let mut p = ReplyParser::default();
        let got = lines(
            &mut p,
            "1000-BIRD 2.0.12\n1011-Router ID is 198.18.0.1\n Hostname is vm\n0013 Daemon is up and running",
        );
        assert!(got[..3].iter().all(|r| *r == Ok(None)));
        let reply = got[3].clone().unwrap().unwrap();
        assert_eq!(reply.lines[2], (1011, "Hostname is vm".into()));
        assert_eq!(reply.message(), "Daemon is up and running");
    }

    #[test]
    fn a_configuration_error_is_a_refusal_in_birds_words() {
        let mut p = ReplyParser::default();
        let got = lines(
            &mut p,
            "0002-Reading configuration from /etc/bird/bird.conf\n8002 /etc/bird/bird.conf:12:3 syntax error, unexpected CF_SYM_UNDEFINED",
        );
        let reply = got[1].clone().unwrap().unwrap();
        assert_eq!(
            configure_outcome(&reply),
            Err("/etc/bird/bird.conf:12:3 syntax error, unexpected CF_SYM_UNDEFINED".into())
        );
        for (text, ok) in [
            ("0004 Reconfiguration in progress", true),
            ("0005 Reconfiguration already in progress, queueing new config", true),
            ("0006 Reconfiguration ignored, shutting down", false),
            ("0016 Access restricted", false),
            ("9001 Parse error", false),
        ] {
            let reply = ReplyParser::default().line(text).unwrap().unwrap();
            assert_eq!(configure_outcome(&reply).is_ok(), ok, "{text}");
        }
    }

    #[test]
    fn lines_that_are_not_the_control_protocol_are_errors() {
        for bad in ["", "HTTP/1.1 400 Bad Request", "12a4 x", "00012 x", "0001x"] {
            assert!(ReplyParser::default().line(bad).is_err(), "{bad:?}");
        }
        assert!(ReplyParser::default().line(" continued").is_err(), "a reply cannot begin with a continuation");
        assert_eq!(ReplyParser::default().line("0000").unwrap().unwrap().code, 0);
    }

    #[test]
    fn a_refusal_says_where_to_look() {
        let file = Path::new("/run/xdplb/eth0.bird.conf");
        assert_eq!(
            refusal_text("/etc/bird/bird.conf:12:3 syntax error, unexpected CF_SYM_UNDEFINED", file),
            "BIRD refused the new routes: /etc/bird/bird.conf:12:3 syntax error, unexpected CF_SYM_UNDEFINED (the \
             routes file /run/xdplb/eth0.bird.conf stays; fix bird.conf, xdplb retries every second)"
        );
        assert!(refusal_text("/run/xdplb/eth0.bird.conf:2:24 Symbol 'xdplb_vips4' already defined", file).ends_with(
            "does another file bird.conf includes define xdplb_vips4 or xdplb_vips6 too? xdplb retries every second)"
        ));
        assert!(
            refusal_text(
                "/etc/bird/bird.conf:3:10 Unable to open included file /run/xdplb/eth0.bird.conf: Permission denied",
                file
            )
            .contains("BIRD runs as user bird")
        );
        assert!(
            refusal_text(
                "/etc/bird/bird.conf:3:10 Unable to match pattern /run/xdplb/*.bird.conf: Permission denied",
                file
            )
            .contains("BIRD runs as user bird")
        );
    }

    #[test]
    fn unreachable_says_what_to_do() {
        let socket = Path::new("/run/bird/bird.ctl");
        assert_eq!(
            unreachable_text(socket, &io::Error::from_raw_os_error(libc::ENOENT)),
            "cannot reach BIRD at /run/bird/bird.ctl: No such file or directory (is BIRD running? systemctl start bird)"
        );
        assert_eq!(
            unreachable_text(socket, &io::Error::from_raw_os_error(libc::EACCES)),
            "cannot reach BIRD at /run/bird/bird.ctl: permission denied: add SupplementaryGroups=bird to xdplb.service"
        );
    }
}
