//! systemd's readiness protocol (sd_notify(3)), without libsystemd: one
//! datagram of `KEY=VALUE` lines to the socket named in `NOTIFY_SOCKET`.
//!
//! With `Type=notify` systemd holds `systemctl start` until READY=1, shows
//! the unit as reloading between RELOADING=1 and the next READY=1, and shows
//! STATUS= in `systemctl status`. Without `NOTIFY_SOCKET` (not started by
//! systemd) every function does nothing. A failed send is logged at debug
//! level and never stops the controller: serving traffic matters more than
//! telling systemd about it.

use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
};

use tracing::debug;

/// The controller serves: startup finished, or a reload finished (applied
/// or rejected). `status` is the line `systemctl status` shows.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}\nMAINPID={}", one_line(status), std::process::id()));
}

/// A reload starts; systemd waits for the next READY=1. MONOTONIC_USEC is
/// what `Type=notify-reload` requires to match the message to its signal.
pub fn reloading() {
    send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// Shutdown starts.
pub fn stopping() {
    send("STOPPING=1");
}

fn send(message: &str) {
    // Not started by systemd (or by a supervisor speaking its protocol).
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_to(&socket, message) {
        debug!("telling systemd {message:?} through NOTIFY_SOCKET={} failed: {e}", socket.to_string_lossy());
    }
}

/// Sends `message` as one datagram to `socket`: a path, or an abstract
/// socket name written with a leading '@'.
pub fn send_to(socket: &OsStr, message: &str) -> io::Result<()> {
    let address = match socket.as_bytes() {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name)?,
        [b'/', ..] => SocketAddr::from_pathname(socket)?,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "neither an absolute path nor an @abstract name")),
    };
    let sock = UnixDatagram::unbound()?;
    // A receiver that stopped reading must not block the control loop.
    sock.set_nonblocking(true)?;
    sock.send_to_addr(message.as_bytes(), &address)?;
    Ok(())
}

/// Each field is one line: a newline would start a field of its own.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use std::{
        os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
        time::Duration,
    };

    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = std::env::temp_dir().join(format!("xdplb-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        assert_eq!(receive(&sock), "READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("xdplb-notify-test-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(receive(&sock), "STOPPING=1");
    }

    #[test]
    fn rejects_a_relative_name_and_reports_a_missing_socket() {
        assert_eq!(send_to(OsStr::new("notify.sock"), "READY=1").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(send_to(OsStr::new("/nonexistent/xdplb/notify.sock"), "READY=1").is_err());
    }

    #[test]
    fn a_status_stays_one_field_and_time_moves_forward() {
        assert_eq!(one_line("a\nb"), "a b");
        let (a, b) = (monotonic_usec(), monotonic_usec());
        assert!(a > 0 && b >= a);
    }
}
