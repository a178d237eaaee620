//! Classic pcap files, the libpcap format that tcpdump and Wireshark read:
//! a 24-byte file header, then for every frame a 16-byte record header and
//! the captured bytes. Microsecond timestamps, Ethernet frames.

use std::io::{self, Write};

/// Magic number of a pcap file with microsecond timestamps (written in the
/// machine's byte order; readers detect it).
pub const MAGIC_MICROSECONDS: u32 = 0xa1b2_c3d4;
pub const LINKTYPE_ETHERNET: u32 = 1;

pub struct PcapWriter<W: Write> {
    out: W,
    snaplen: u32,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header: frames of at most `snaplen` bytes are stored.
    pub fn new(mut out: W, snaplen: u32) -> io::Result<Self> {
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&MAGIC_MICROSECONDS.to_ne_bytes());
        header.extend_from_slice(&2u16.to_ne_bytes()); // version 2.4
        header.extend_from_slice(&4u16.to_ne_bytes());
        header.extend_from_slice(&0i32.to_ne_bytes()); // timestamps are UTC
        header.extend_from_slice(&0u32.to_ne_bytes()); // accuracy, unused
        header.extend_from_slice(&snaplen.to_ne_bytes());
        header.extend_from_slice(&LINKTYPE_ETHERNET.to_ne_bytes());
        out.write_all(&header)?;
        Ok(Self { out, snaplen })
    }

    /// One frame of `orig_len` bytes, of which `data` (cut to the snapshot
    /// length) is stored, seen at `unix_ns` nanoseconds since the epoch.
    pub fn write(&mut self, unix_ns: u64, orig_len: u32, data: &[u8]) -> io::Result<()> {
        let data = &data[..data.len().min(self.snaplen as usize)];
        let mut record = Vec::with_capacity(16 + data.len());
        record.extend_from_slice(&((unix_ns / 1_000_000_000) as u32).to_ne_bytes());
        record.extend_from_slice(&((unix_ns % 1_000_000_000 / 1000) as u32).to_ne_bytes());
        record.extend_from_slice(&(data.len() as u32).to_ne_bytes());
        record.extend_from_slice(&orig_len.max(data.len() as u32).to_ne_bytes());
        record.extend_from_slice(data);
        self.out.write_all(&record)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_record_headers() {
        let mut w = PcapWriter::new(Vec::new(), 4).unwrap();
        w.write(1_700_000_000_123_456_789, 60, &[1, 2, 3, 4, 5, 6]).unwrap();
        let b = w.out;
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0), MAGIC_MICROSECONDS);
        assert_eq!((u16::from_ne_bytes([b[4], b[5]]), u16::from_ne_bytes([b[6], b[7]])), (2, 4));
        assert_eq!((u32_at(16), u32_at(20)), (4, LINKTYPE_ETHERNET), "snaplen, link type");
        assert_eq!((u32_at(24), u32_at(28)), (1_700_000_000, 123_456), "seconds, microseconds");
        assert_eq!((u32_at(32), u32_at(36)), (4, 60), "stored, original length");
        assert_eq!(&b[40..], &[1, 2, 3, 4], "cut to the snapshot length");
    }
}
