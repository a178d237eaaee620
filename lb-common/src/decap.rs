//! What the decapsulation program (`xdplb decap`, on a backend) accepts: the
//! outer sources allowed to send IP-in-IP here and the inner destinations
//! (VIPs) it delivers. Not a map: `xdplb decap` writes it into the program's
//! read-only data at load time (aya's `EbpfLoader::set_global`), so the
//! balancer's pinned maps stay as they are and the verifier sees constants.
//!
//! Addresses and masks are raw network-order bytes read as native words, as
//! in `maps` (IPv4 in one word).

/// The symbol of the filter in the eBPF object.
pub const DECAP_FILTER_SYMBOL: &str = "DECAP_FILTER";

/// Outer-source prefixes per family, at most.
pub const DECAP_MAX_SOURCES: usize = 16;
/// Inner destinations per family, at most.
pub const DECAP_MAX_VIPS: usize = 64;

/// `flags`: only outer sources in `source_v4`/`source_v6` are decapsulated.
pub const DECAP_F_SOURCES: u32 = 1 << 0;
/// `flags`: only inner destinations in `vip_v4`/`vip_v6` are decapsulated.
pub const DECAP_F_VIPS: u32 = 1 << 1;

/// An IPv4 prefix: `addr` already masked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix4 {
    pub addr: u32,
    pub mask: u32,
}

/// An IPv6 prefix: `addr` already masked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// The decapsulation filter. All zeros (the default) accepts everything,
/// as the program did before it had a filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapFilter {
    /// `DECAP_F_*`.
    pub flags: u32,
    /// Entries used in each list below.
    pub sources_v4: u32,
    pub sources_v6: u32,
    pub vips_v4: u32,
    pub vips_v6: u32,
    pub _pad: u32,
    pub source_v4: [Prefix4; DECAP_MAX_SOURCES],
    pub source_v6: [Prefix6; DECAP_MAX_SOURCES],
    pub vip_v4: [u32; DECAP_MAX_VIPS],
    pub vip_v6: [[u32; 4]; DECAP_MAX_VIPS],
}

impl DecapFilter {
    /// Accepts every outer source and every inner destination.
    pub const ANY: Self = Self {
        flags: 0,
        sources_v4: 0,
        sources_v6: 0,
        vips_v4: 0,
        vips_v6: 0,
        _pad: 0,
        source_v4: [Prefix4 { addr: 0, mask: 0 }; DECAP_MAX_SOURCES],
        source_v6: [Prefix6 { addr: [0; 4], mask: [0; 4] }; DECAP_MAX_SOURCES],
        vip_v4: [0; DECAP_MAX_VIPS],
        vip_v6: [[0; 4]; DECAP_MAX_VIPS],
    };
}

impl Default for DecapFilter {
    fn default() -> Self {
        Self::ANY
    }
}

/// The mask of a `len`-bit IPv4 prefix, as a native word of network-order bytes.
pub fn mask_v4(len: u8) -> u32 {
    let host = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32) as u32) };
    host.to_be()
}

/// The mask of a `len`-bit IPv6 prefix, as four native words of network-order bytes.
pub fn mask_v6(len: u8) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, w) in out.iter_mut().enumerate() {
        let bits = (len as i32 - 32 * i as i32).clamp(0, 32) as u32;
        let host = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        *w = host.to_be();
    }
    out
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for super::DecapFilter {}
}

#[cfg(test)]
mod tests {
    use super::{mask_v4, mask_v6};

    #[test]
    fn masks_cover_the_prefix_bits_in_network_order() {
        assert_eq!(mask_v4(0), 0);
        assert_eq!(mask_v4(24).to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(mask_v4(32), u32::MAX);
        assert_eq!(mask_v6(0), [0; 4]);
        assert_eq!(mask_v6(96), [u32::MAX, u32::MAX, u32::MAX, 0]);
        assert_eq!(mask_v6(40)[1].to_ne_bytes(), [255, 0, 0, 0]);
        assert_eq!(mask_v6(128), [u32::MAX; 4]);
    }
}
