//! Key layouts of the store's trees. Integers are big-endian so that byte
//! order is numeric order and range scans walk them in sequence.

pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn read_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// `a ++ b`, both 8 bytes.
pub fn pair(a: [u8; 8], b: [u8; 8]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a);
    k[8..].copy_from_slice(&b);
    k
}

/// `[tag] ++ id, its bits reversed`: the dialogs-by-status index (since
/// layout 4). Dialog ids grow, and sled splits a full leaf in half, so
/// keys written in order leave every leaf half full and rewrite the
/// newest one again and again; reversed, consecutive ids land all over
/// the tree as random keys do. The index is only read a status at a
/// time, so its order within a status does not matter.
pub fn status_key(tag: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&id.reverse_bits().to_be_bytes());
    k
}

/// The dialog id of a [`status_key`].
pub fn status_key_dialog(key: &[u8]) -> u64 {
    read_u64(&key[1..]).reverse_bits()
}

/// `name ++ 0x00`: the prefix of one audience in the uncontacted index.
pub fn audience_prefix(audience: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(audience.len() + 17);
    k.extend_from_slice(audience.as_bytes());
    k.push(0);
    k
}

/// `name ++ 0x00 ++ pick_key ++ contact`: the uncontacted index.
pub fn uncontacted_key(audience: &str, pick_key: u64, contact: u64) -> Vec<u8> {
    let mut k = audience_prefix(audience);
    k.extend_from_slice(&pick_key.to_be_bytes());
    k.extend_from_slice(&contact.to_be_bytes());
    k
}

/// `account ++ 0x00 ++ transport id`: inbound messages already stored.
pub fn inbound_key(account: &str, transport_id: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.len() + 9);
    k.extend_from_slice(account.as_bytes());
    k.push(0);
    k.extend_from_slice(&transport_id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keys_spread_consecutive_ids_and_read_back() {
        let (a, b) = (status_key(2, 41), status_key(2, 42));
        assert_eq!(a[0], 2);
        assert_eq!((status_key_dialog(&a), status_key_dialog(&b)), (41, 42));
        // 41 and 42 differ in their low bits: reversed, in their first byte.
        assert_ne!(a[1], b[1]);
    }
}
