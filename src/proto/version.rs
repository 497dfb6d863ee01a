//! Protocol versions and how two peers agree on one.
//!
//! Each side speaks a range of versions; the host's `Hello` carries its range and
//! the agent picks the highest version both speak. Keeping the previous version
//! in our range lets a new host drive an old agent (and the reverse) for one
//! release, which is how long a guest image typically lags behind its host.

/// The newest version we speak; carried by every frame after `Hello`.
pub const PROTOCOL_VERSION: u16 = 4;

/// The oldest version we still speak: `PROTOCOL_VERSION - 1` once there is a 2.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The version to use with a peer speaking `peer_min..=peer_max`, or `None` if
/// we share none.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    negotiate_between(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, peer_min, peer_max)
}

/// The highest version in both ranges. Version 0 does not exist.
fn negotiate_between(our_min: u16, our_max: u16, peer_min: u16, peer_max: u16) -> Option<u16> {
    let high = our_max.min(peer_max);
    let low = our_min.max(peer_min).max(1);
    (low <= high).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_common_version() {
        // (ours, peer's, expected)
        let table = [
            ((1, 1), (1, 1), Some(1)),
            ((1, 2), (1, 1), Some(1)), // new host, old agent
            ((1, 1), (1, 2), Some(1)), // old agent, new host
            ((1, 2), (1, 2), Some(2)),
            ((1, 2), (2, 3), Some(2)),
            ((2, 3), (1, 2), Some(2)),
            ((2, 3), (2, 3), Some(3)),
            ((2, 3), (1, 1), None), // peer too old
            ((1, 1), (2, 3), None), // peer too new
            ((1, 1), (2, 1), None), // peer range is empty
            ((1, 1), (0, 0), None), // version 0 does not exist
            ((0, 1), (0, 0), None),
            ((1, u16::MAX), (7, u16::MAX), Some(u16::MAX)),
        ];
        for ((our_min, our_max), (peer_min, peer_max), want) in table {
            assert_eq!(
                negotiate_between(our_min, our_max, peer_min, peer_max),
                want,
                "ours {our_min}..={our_max}, peer {peer_min}..={peer_max}"
            );
        }
    }

    #[test]
    fn negotiate_uses_our_current_range() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2), None);
        assert_eq!(negotiate(0, 0), None);
    }
}
