//! `xdplb decap`: attaches the IP-in-IP decapsulation program to a
//! backend's interface, with what it accepts: the outer sources (the
//! balancers' `ipip_source_v4/v6`) and the inner destinations (the VIPs).
//!
//! The filter is written into the program's read-only data when it is
//! loaded (`lb_common::decap`), not into a map: the program is this
//! command's own, nothing of it is shared with a running balancer, and a
//! new filter is a new program swapped into the pinned link (run the
//! command again). IP-in-IP the filter refuses is dropped, not passed: a
//! kernel ipip device on the backend would decapsulate it past the filter.

use std::{fmt, net::IpAddr, path::Path, str::FromStr};

use anyhow::{Context as _, Result};
use lb_common::{
    decap::{
        DECAP_F_SOURCES, DECAP_F_VIPS, DECAP_MAX_SOURCES, DECAP_MAX_VIPS, DecapFilter, Prefix4, Prefix6, mask_v4,
        mask_v6,
    },
    maps::programs,
};
use tracing::{info, warn};

use crate::{
    addr, attach,
    config::XdpModeSetting,
    dataplane::{Dataplane, MapSizes},
    pins,
};

/// An outer-source prefix, as `--allow-source` takes it: `ADDRESS/LENGTH`,
/// or an address alone (one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for SourcePrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("`{a}` is not an IP address (write e.g. 198.18.255.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => {
                l.parse().ok().filter(|&n| n <= max).ok_or_else(|| format!("prefix length `{l}` is not 0..={max}"))?
            }
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What `xdplb decap` attaches, and where.
pub struct Options {
    pub iface: String,
    pub mode: XdpModeSetting,
    pub ephemeral: bool,
    /// Outer sources decapsulated; empty: any.
    pub allow_sources: Vec<SourcePrefix>,
    /// Inner destinations decapsulated; empty: any.
    pub vips: Vec<IpAddr>,
}

/// The program's filter for these lists (empty lists accept anything);
/// an error when a list is longer than the program holds.
pub fn filter(sources: &[SourcePrefix], vips: &[IpAddr]) -> Result<DecapFilter> {
    let mut f = DecapFilter::ANY;
    let mut push_source = |p: &SourcePrefix| -> Result<()> {
        match p.addr {
            IpAddr::V4(_) => {
                let mask = mask_v4(p.len);
                let entry = Prefix4 { addr: addr::words(p.addr)[0] & mask, mask };
                let used = &mut f.source_v4[..f.sources_v4 as usize];
                if !used.contains(&entry) {
                    let slot = f.source_v4.get_mut(f.sources_v4 as usize).with_context(too_many_sources)?;
                    *slot = entry;
                    f.sources_v4 += 1;
                }
            }
            IpAddr::V6(_) => {
                let mask = mask_v6(p.len);
                let words = addr::words(p.addr);
                let entry = Prefix6 { addr: std::array::from_fn(|i| words[i] & mask[i]), mask };
                let used = &mut f.source_v6[..f.sources_v6 as usize];
                if !used.contains(&entry) {
                    let slot = f.source_v6.get_mut(f.sources_v6 as usize).with_context(too_many_sources)?;
                    *slot = entry;
                    f.sources_v6 += 1;
                }
            }
        }
        Ok(())
    };
    for p in sources {
        push_source(p)?;
    }
    if !sources.is_empty() {
        f.flags |= DECAP_F_SOURCES;
    }
    for &v in vips {
        let words = addr::words(v);
        match v {
            IpAddr::V4(_) => {
                if !f.vip_v4[..f.vips_v4 as usize].contains(&words[0]) {
                    *f.vip_v4.get_mut(f.vips_v4 as usize).with_context(too_many_vips)? = words[0];
                    f.vips_v4 += 1;
                }
            }
            IpAddr::V6(_) => {
                if !f.vip_v6[..f.vips_v6 as usize].contains(&words) {
                    *f.vip_v6.get_mut(f.vips_v6 as usize).with_context(too_many_vips)? = words;
                    f.vips_v6 += 1;
                }
            }
        }
    }
    if !vips.is_empty() {
        f.flags |= DECAP_F_VIPS;
    }
    Ok(f)
}

fn too_many_sources() -> String {
    format!("at most {DECAP_MAX_SOURCES} --allow-source prefixes per address family")
}

fn too_many_vips() -> String {
    format!("at most {DECAP_MAX_VIPS} --vip addresses per address family")
}

/// The warning `xdplb decap` logs when it accepts any outer source.
pub fn open_warning(iface: &str) -> String {
    format!(
        "{iface}: decapsulating IP-in-IP from any outer source: any host that can send to {iface} can have a \
         packet delivered to the VIPs here as if from any client; restrict it with --allow-source PREFIX \
         (repeatable: the balancers' ipip_source_v4 and ipip_source_v6, e.g. --allow-source 198.18.255.0/24)"
    )
}

fn list<T: ToString>(items: &[T]) -> String {
    if items.is_empty() { "any".into() } else { items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") }
}

/// Loads the decapsulation program with the filter of `opts` and attaches
/// it to the interface (or swaps it into the link an earlier run pinned).
pub fn attach(pin_root: &Path, opts: &Options) -> Result<attach::Attached> {
    let filter = filter(&opts.allow_sources, &opts.vips)?;
    if opts.allow_sources.is_empty() {
        warn!("{}", open_warning(&opts.iface));
    }
    pins::ensure_bpffs(pin_root, opts.ephemeral)?;
    let dir = pin_root.join(&opts.iface);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {} failed", dir.display()))?;
    // Small maps: only the program's counters matter here.
    let sizes = MapSizes { max_vips: 1, max_backends: 1, conntrack: 1, maglev_pool: 1024, nat_table: 1 };
    let mut dp = Dataplane::load_decap(sizes, &filter)?;
    let how = attach::attach(&mut dp, programs::DECAP, &opts.iface, opts.mode, &dir.join("decap_link"))?;
    info!(
        interface = opts.iface,
        "decapsulating IP-in-IP from outer sources {} to inner destinations {}; other IP-in-IP is dropped",
        list(&opts.allow_sources),
        list(&opts.vips)
    );
    Ok(how)
}

#[cfg(test)]
mod tests {
    use lb_common::decap::{DECAP_F_SOURCES, DECAP_F_VIPS, DECAP_MAX_SOURCES, DecapFilter};

    use super::{SourcePrefix, filter};

    fn p(s: &str) -> SourcePrefix {
        s.parse().unwrap()
    }

    #[test]
    fn decap_prefixes_parse_with_or_without_a_length() {
        assert_eq!(p("198.18.255.0/24").len, 24);
        assert_eq!(p("198.18.255.7").len, 32);
        assert_eq!(p("2001:db8:ffff::/96").len, 96);
        assert_eq!(p("2001:db8::1").len, 128);
        assert!("198.18.0.0/33".parse::<SourcePrefix>().unwrap_err().contains("0..=32"));
        assert!("lb1/24".parse::<SourcePrefix>().unwrap_err().contains("not an IP address"));
    }

    #[test]
    fn decap_empty_lists_accept_anything() {
        assert_eq!(filter(&[], &[]).unwrap(), DecapFilter::ANY);
    }

    #[test]
    fn decap_filter_holds_masked_prefixes_and_vips_per_family() {
        let f = filter(
            &[p("198.18.255.9/24"), p("198.18.255.0/24"), p("2001:db8:ffff::1/96")],
            &["198.18.100.1".parse().unwrap(), "2001:db8:100::1".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(f.flags, DECAP_F_SOURCES | DECAP_F_VIPS);
        // The host bits go, and the duplicate with them.
        assert_eq!((f.sources_v4, f.sources_v6, f.vips_v4, f.vips_v6), (1, 1, 1, 1));
        assert_eq!(f.source_v4[0].addr.to_ne_bytes(), [198, 18, 255, 0]);
        assert_eq!(f.source_v4[0].mask.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(f.source_v6[0].addr[3], 0);
        assert_eq!(f.vip_v4[0].to_ne_bytes(), [198, 18, 100, 1]);
        // Only destinations: sources stay open.
        let f = filter(&[], &["198.18.100.1".parse().unwrap()]).unwrap();
        assert_eq!(f.flags, DECAP_F_VIPS);
    }

    #[test]
    fn decap_too_many_prefixes_are_refused_with_the_limit() {
        let many: Vec<SourcePrefix> = (0..=DECAP_MAX_SOURCES).map(|i| p(&format!("198.18.{i}.0/24"))).collect();
        let e = filter(&many, &[]).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("at most {DECAP_MAX_SOURCES} --allow-source")), "{e:#}");
    }
}
