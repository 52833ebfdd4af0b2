//! The XDP guard's map layout.

/// Default capacity of the per-source map; the daemon may override it at load time.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;
/// Default capacity of the allow/deny policy map (and of the prefix policy map).
pub const DEFAULT_MAX_POLICIES: u32 = 131_072;
/// Map flag: entries are allocated when written instead of all at load time.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// Length of the per-source rate window.
pub const WINDOW_NS: u64 = 5_000_000_000;
/// Slots of the global per-second series (a ring indexed by second).
pub const SECOND_SLOTS: u32 = 64;
/// Words of the protected-ports bitmap (one bit per TCP port).
pub const PORT_WORDS: u32 = 65_536 / 32;

/// Key of the per-source and policy maps: the source address as 16 bytes. IPv4 sources are
/// stored as IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) so one map serves both families.
/// Aligned to 8 so the guard reads it as two words, not sixteen bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
}

impl SourceKey {
    pub const fn from_ipv4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_ipv6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// The address as two native-endian words (its bytes in memory order), the form the
    /// guard compares and the deny cache stores.
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        // SAFETY: 16 bytes to 16 bytes; every bit pattern is a valid u64.
        unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(self.addr) }
    }

    #[inline(always)]
    pub const fn from_words(words: [u64; 2]) -> Self {
        // SAFETY: 16 bytes to 16 bytes; every bit pattern is a valid byte.
        Self {
            addr: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) },
        }
    }
}

/// Value of the per-source map, one copy per CPU. Times are `bpf_ktime_get_coarse_ns()`
/// (CLOCK_MONOTONIC_COARSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYNs (without ACK) to a protected port: new connection attempts.
    pub new_tcp: u64,
    pub last_seen_ns: u64,
    /// `now / WINDOW_NS` of the window `window_packets` counts in.
    pub window_epoch: u64,
    pub window_packets: u64,
}

/// Value of the policy map (per-CPU: every CPU holds the same settings and its own drop
/// count): an allow entry, a deny entry, or both (allow wins).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// 0 = no expiry; otherwise the entry stops applying at this coarse-monotonic time.
    pub allow_until_ns: u64,
    pub deny_until_ns: u64,
    /// `POLICY_ALLOW` | `POLICY_DENY`.
    pub flags: u32,
    /// A `DenyReason` discriminant.
    pub deny_reason: u32,
    /// Packets this CPU dropped because of this entry. Denied packets are not counted in the
    /// per-source map: the drop path stops at the policy lookup, to stay cheap under a flood.
    /// Drops served from the deny cache are counted in the cache slot and folded in here when
    /// the slot is refilled; readers add the slot's counts (see `DenyCacheSlot`).
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Set by the daemon when the entry is created (never changed while it lives), so counts a
    /// cache slot holds for an entry that was removed are not credited to a later entry for
    /// the same source.
    pub serial: u64,
}

pub const POLICY_ALLOW: u32 = 1;
pub const POLICY_DENY: u32 = 2;

/// The guard's settings, written by the daemon (one value in `PH_GUARD_CFG`).
///
/// IPv6 sources are blocked by prefix: an IPv6 source whose own address has no live entry in
/// `PH_POLICY` is looked up once more in `PH_POLICY_NET`, its address masked to the prefix
/// (`[sources] ipv6_prefix`). The second lookup is made only while that map holds entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// `SourceKey::words` of the prefix mask (`ipv6_mask(prefix_len)`).
    pub ipv6_mask: [u64; 2],
    /// The prefix length the entries of `PH_POLICY_NET` have.
    pub prefix_len: u32,
    /// Non-zero while `PH_POLICY_NET` holds entries.
    pub prefix_lookup: u32,
}

/// The words (as `SourceKey::words`) that keep the first `len` bits of an address.
pub const fn ipv6_mask(len: u32) -> [u64; 2] {
    let bits: u128 = if len == 0 {
        0
    } else if len >= 128 {
        u128::MAX
    } else {
        u128::MAX << (128 - len)
    };
    SourceKey::from_ipv6(bits.to_be_bytes()).words()
}

/// Why a source is denied; each reason has its own drop counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// An operator's `datapath deny`.
    Manual = 1,
    /// The sentry's penalty box escalated to a kernel drop.
    Penalty = 2,
}

impl DenyReason {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(DenyReason::Manual),
            2 => Some(DenyReason::Penalty),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DenyReason::Manual => "manual",
            DenyReason::Penalty => "penalty",
        }
    }
}

/// log2 of the deny cache's slots per CPU.
pub const DENY_CACHE_BITS: u32 = 12;
/// Slots of the deny cache, per CPU.
pub const DENY_CACHE_SLOTS: u32 = 1 << DENY_CACHE_BITS;

/// One slot of the guard's per-CPU deny cache: a live deny the guard found in the policy map,
/// copied where the next packet from that source finds it with one array access instead of a
/// hash lookup. Direct-mapped by `deny_cache_slot`. A slot is valid while its `generation`
/// equals the policy generation (the daemon bumps it after any write that can lift or change a
/// deny) and, unless `until_ns` is 0, until `until_ns`; only denies are cached, so a new deny
/// needs no bump.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyCacheSlot {
    /// `SourceKey::words` of the source.
    pub addr: [u64; 2],
    pub generation: u64,
    /// The policy entry's `serial` when the slot was filled.
    pub serial: u64,
    /// The entry's `deny_until_ns`.
    pub until_ns: u64,
    /// The drop `Verdict` as u32; 0 = empty slot.
    pub verdict: u32,
    /// 0: the entry of `PH_POLICY` for the source `addr`; 1: the entry of `PH_POLICY_NET` for
    /// the prefix `addr` (masked). The guard looks for each kind separately, so a prefix's slot
    /// never answers for an address that has an entry of its own.
    pub net: u32,
    /// Drops counted here since the slot was filled; folded into the policy entry (if its serial
    /// still matches) when the slot is refilled.
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// The deny-cache slot of a source: a multiplicative hash of the folded address. Shared by the
/// guard and the daemon, which reads a denied source's unfolded counts from this slot.
#[inline(always)]
pub const fn deny_cache_slot(words: [u64; 2]) -> u32 {
    let [a, b] = words;
    let x = a ^ b;
    let folded = (x ^ (x >> 32)) as u32;
    folded.wrapping_mul(0x9e37_79b1) >> (32 - DENY_CACHE_BITS)
}

/// Slots of the pass cache, per CPU (direct-mapped by `deny_cache_slot`, like the deny cache).
pub const PASS_CACHE_SLOTS: u32 = DENY_CACHE_SLOTS;
/// How long a pass-cache slot counts a source's packets before they go to `PH_SOURCES`: the
/// shared entry (and its place in the LRU) is written at most this often for a busy source.
pub const PASS_FLUSH_NS: u64 = 1_000_000_000;

/// One slot of the guard's per-CPU pass cache: a source the guard passed, with the verdict,
/// and its packets counted since they were last added to its `PH_SOURCES` entry. A packet
/// from that source whose slot is still valid (same policy generation, before `until_ns`)
/// passes with one array access: no policy lookup, no per-source map update. Any other
/// packet takes the full path, which first adds what the slot holds to the entry of the
/// slot's source (`SourceStats::add_pending`), so nothing counted is lost; readers of
/// `PH_SOURCES` add what slots still hold (the same function), so counts stay exact.
///
/// Only passes are cached. The daemon bumps the policy generation after every write to the
/// policy maps or the guard's settings, so a new deny applies to the next packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassCacheSlot {
    /// `SourceKey::words` of the source.
    pub addr: [u64; 2],
    pub generation: u64,
    /// The slot answers for packets before this time: the earliest of an allow entry's
    /// expiry, the end of the window `window_epoch` and `PASS_FLUSH_NS` after the fill.
    pub until_ns: u64,
    /// The pass `Verdict` as u32.
    pub verdict: u32,
    /// 1 while the slot holds a source (its counts below belong to `addr`), 0 when empty.
    pub filled: u32,
    /// The window the pending packets count in (`now / WINDOW_NS` at the fill).
    pub window_epoch: u64,
    /// Pending counts, not yet in `PH_SOURCES`.
    pub packets: u64,
    pub bytes: u64,
    pub new_tcp: u64,
    pub last_seen_ns: u64,
}

impl SourceStats {
    /// Adds the counts a pass-cache slot holds for this source (the same CPU's copy).
    #[inline(always)]
    pub fn add_pending(&mut self, slot: &PassCacheSlot) {
        if slot.packets == 0 {
            return;
        }
        self.packets += slot.packets;
        self.bytes += slot.bytes;
        self.new_tcp += slot.new_tcp;
        if slot.last_seen_ns > self.last_seen_ns {
            self.last_seen_ns = slot.last_seen_ns;
        }
        if slot.window_epoch == self.window_epoch {
            self.window_packets += slot.packets;
        } else if slot.window_epoch > self.window_epoch {
            self.window_epoch = slot.window_epoch;
            self.window_packets = slot.packets;
        }
    }
}

/// One second of the global packet series, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondSlot {
    /// Coarse-monotonic second this slot counts; a slot whose second is stale is reset.
    pub second: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// The guard's per-CPU view of time. `bpf_ktime_get_coarse_ns` is a helper call, while
/// `bpf_jiffies64` is inlined by the verifier into one load; both advance on the timer tick,
/// so the guard reads the coarse clock again only when jiffies moved. Where the current second
/// and 5-second window end is kept too, so the guard divides once per second, not per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardClock {
    pub jiffies: u64,
    /// CLOCK_MONOTONIC_COARSE at the last jiffies change.
    pub now_ns: u64,
    pub second: u64,
    pub second_end_ns: u64,
    /// `now / WINDOW_NS`.
    pub epoch: u64,
    pub epoch_end_ns: u64,
}

/// Everything the guard counts for every packet, in one per-CPU value: the clock, the global
/// per-second series (a ring indexed by second) and the counters by verdict. One map access
/// per packet instead of three.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardCounters {
    pub clock: GuardClock,
    pub seconds: [SecondSlot; SECOND_SLOTS as usize],
    /// Indexed by `Verdict`.
    pub verdicts: [TrafficCounter; Verdict::SLOTS as usize],
}

impl Default for GuardCounters {
    fn default() -> Self {
        Self {
            clock: GuardClock::default(),
            seconds: [SecondSlot::default(); SECOND_SLOTS as usize],
            verdicts: [TrafficCounter::default(); Verdict::SLOTS as usize],
        }
    }
}

/// Value of the verdict counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// What the guard did with a packet and why. The discriminant is the slot in the verdict map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed: IPv4, source counted.
    PassIpv4 = 0,
    /// Passed: IPv6, source counted.
    PassIpv6 = 1,
    /// Passed: not IP (ARP, LLDP, ...); nothing to attribute.
    PassNonIp = 2,
    /// Passed: an IP ethertype whose header is cut short; the stack will discard it.
    PassMalformed = 3,
    /// Passed: the per-source map refused the update (should not happen with an LRU map).
    PassUntracked = 4,
    /// Passed: the source is on the allow list (even if also denied).
    PassAllowed = 5,
    /// Dropped: denied by an operator.
    DropManual = 6,
    /// Dropped: in the sentry's penalty box.
    DropPenalty = 7,
}

impl Verdict {
    /// Every verdict, in slot order.
    pub const ALL: [Verdict; 8] = [
        Verdict::PassIpv4,
        Verdict::PassIpv6,
        Verdict::PassNonIp,
        Verdict::PassMalformed,
        Verdict::PassUntracked,
        Verdict::PassAllowed,
        Verdict::DropManual,
        Verdict::DropPenalty,
    ];

    /// The verdict map's size: room for reasons later programs add.
    pub const SLOTS: u32 = 32;

    pub const fn for_deny(reason: u32) -> Verdict {
        match DenyReason::from_u32(reason) {
            Some(DenyReason::Penalty) => Verdict::DropPenalty,
            _ => Verdict::DropManual,
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(self, Verdict::DropManual | Verdict::DropPenalty)
    }

    /// `pass` or `drop`.
    pub const fn action(self) -> &'static str {
        if self.is_drop() { "drop" } else { "pass" }
    }

    /// Why, as a metric label.
    pub const fn reason(self) -> &'static str {
        match self {
            Verdict::PassIpv4 => "ipv4",
            Verdict::PassIpv6 => "ipv6",
            Verdict::PassNonIp => "non_ip",
            Verdict::PassMalformed => "malformed",
            Verdict::PassUntracked => "untracked",
            Verdict::PassAllowed => "allowed",
            Verdict::DropManual => "denied_manual",
            Verdict::DropPenalty => "denied_penalty",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], contain only integers and have no padding (checked below).
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SourceStats {}
    unsafe impl aya::Pod for super::TrafficCounter {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::SecondSlot {}
    unsafe impl aya::Pod for super::DenyCacheSlot {}
    unsafe impl aya::Pod for super::PassCacheSlot {}
    unsafe impl aya::Pod for super::GuardClock {}
    unsafe impl aya::Pod for super::GuardCounters {}
    unsafe impl aya::Pod for super::GuardConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped() {
        let key = SourceKey::from_ipv4([192, 0, 2, 7]);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
    }

    #[test]
    fn key_words_round_trip_and_slots_spread() {
        let key = SourceKey::from_ipv6([
            0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ]);
        assert_eq!(SourceKey::from_words(key.words()), key);
        // Consecutive IPv4 sources (a /22 of attackers) must not pile into a few slots.
        let mut used = [false; DENY_CACHE_SLOTS as usize];
        for i in 0u32..1024 {
            let o = (0xc633_6400u32 + i).to_be_bytes();
            let slot = deny_cache_slot(SourceKey::from_ipv4(o).words());
            assert!(slot < DENY_CACHE_SLOTS);
            used[slot as usize] = true;
        }
        assert!(used.iter().filter(|u| **u).count() >= 1000);
    }

    #[test]
    fn pending_counts_join_the_entry_and_its_window() {
        let entry = SourceStats {
            packets: 10,
            bytes: 1000,
            new_tcp: 1,
            last_seen_ns: 50,
            window_epoch: 7,
            window_packets: 4,
        };
        let slot = PassCacheSlot {
            filled: 1,
            window_epoch: 7,
            packets: 3,
            bytes: 300,
            new_tcp: 2,
            last_seen_ns: 60,
            ..Default::default()
        };
        let mut same = entry;
        same.add_pending(&slot);
        assert_eq!(
            (same.packets, same.bytes, same.new_tcp, same.last_seen_ns),
            (13, 1300, 3, 60)
        );
        assert_eq!((same.window_epoch, same.window_packets), (7, 7));
        // Pending packets of a later window start that window.
        let mut later = entry;
        later.add_pending(&PassCacheSlot {
            window_epoch: 8,
            ..slot
        });
        assert_eq!((later.window_epoch, later.window_packets), (8, 3));
        // An empty slot changes nothing.
        let mut untouched = entry;
        untouched.add_pending(&PassCacheSlot { packets: 0, ..slot });
        assert_eq!(untouched, entry);
    }

    #[test]
    fn verdict_slots_are_dense_and_fit() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as u32, i as u32);
        }
        assert!((Verdict::ALL.len() as u32) <= Verdict::SLOTS);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<SourceKey>(), 16);
        assert_eq!(core::mem::size_of::<SourceStats>(), 6 * 8);
        assert_eq!(core::mem::size_of::<TrafficCounter>(), 16);
        assert_eq!(core::mem::size_of::<Policy>(), 48);
        assert_eq!(core::mem::size_of::<DenyCacheSlot>(), 64);
        assert_eq!(core::mem::size_of::<PassCacheSlot>(), 80);
        assert_eq!(
            core::mem::size_of::<GuardCounters>(),
            6 * 8 + 64 * 24 + 32 * 16
        );
        assert_eq!(core::mem::size_of::<SecondSlot>(), 24);
        assert_eq!(core::mem::size_of::<GuardConfig>(), 24);
    }

    #[test]
    fn prefix_masks_keep_the_leading_bits() {
        let key = SourceKey::from_ipv6([
            0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0xaa, 0xbb, 0, 0, 0, 0, 0, 9,
        ]);
        let [a, b] = key.words();
        let [m0, m1] = ipv6_mask(64);
        let masked = SourceKey::from_words([a & m0, b & m1]);
        assert_eq!(
            masked.addr,
            [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let [m0, m1] = ipv6_mask(56);
        let masked = SourceKey::from_words([a & m0, b & m1]);
        assert_eq!(
            masked.addr,
            [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(ipv6_mask(128), [u64::MAX, u64::MAX]);
    }

    #[test]
    fn deny_reasons_map_to_drop_verdicts() {
        assert_eq!(
            Verdict::for_deny(DenyReason::Manual as u32),
            Verdict::DropManual
        );
        assert_eq!(
            Verdict::for_deny(DenyReason::Penalty as u32),
            Verdict::DropPenalty
        );
        assert!(Verdict::DropPenalty.is_drop() && !Verdict::PassAllowed.is_drop());
    }
}
