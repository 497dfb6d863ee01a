//! The payload encoding: a growing [`Encoder`] and a bounds-checked [`Decoder`].
//!
//! Integers are fixed-width little-endian; strings, byte strings and lists are
//! prefixed by a `u32` length or count; options by a `u8` tag. The decoder checks
//! every length and count against both the field's cap and the bytes still
//! unread *before* it allocates, so a tiny hostile payload cannot make us
//! reserve gigabytes. The encoder enforces the same caps, so we never send what
//! the peer would reject. Field names (`what`) end up in `BadField` errors.

use super::error::ProtoError;

/// Appends fields to a payload.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// A length or count prefix, refusing values over `max`.
    fn len(&mut self, what: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
        if len > max {
            return Err(ProtoError::BadField { what });
        }
        let len = u32::try_from(len).map_err(|_| ProtoError::BadField { what })?;
        self.u32(len);
        Ok(())
    }

    pub fn bytes(&mut self, what: &'static str, v: &[u8], max: usize) -> Result<(), ProtoError> {
        self.len(what, v.len(), max)?;
        self.buf.extend_from_slice(v);
        Ok(())
    }

    pub fn str(&mut self, what: &'static str, v: &str, max: usize) -> Result<(), ProtoError> {
        self.bytes(what, v.as_bytes(), max)
    }

    /// A list: count, then each item written by `item`.
    pub fn list<T>(
        &mut self,
        what: &'static str,
        items: &[T],
        max: usize,
        mut item: impl FnMut(&mut Self, &T) -> Result<(), ProtoError>,
    ) -> Result<(), ProtoError> {
        self.len(what, items.len(), max)?;
        items.iter().try_for_each(|v| item(self, v))
    }

    /// An option: tag 0, or tag 1 then the value written by `some`.
    pub fn option<T>(
        &mut self,
        v: Option<&T>,
        some: impl FnOnce(&mut Self, &T) -> Result<(), ProtoError>,
    ) -> Result<(), ProtoError>
    where
        T: ?Sized,
    {
        match v {
            None => {
                self.u8(0);
                Ok(())
            }
            Some(v) => {
                self.u8(1);
                some(self, v)
            }
        }
    }
}

/// Reads fields from a payload, front to back.
#[derive(Debug)]
pub struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Self { rest: payload }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Succeeds only if every byte was read (payloads are strict).
    pub fn finish(self, kind: u16) -> Result<(), ProtoError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(ProtoError::TrailingBytes { kind, extra }),
        }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.rest.len() {
            return Err(ProtoError::BadField { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, ProtoError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::BadField { what }),
        }
    }

    /// A `u32` length or count, checked against `max` and against what
    /// `min_item` bytes per unit would need from the unread bytes.
    fn len(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, ProtoError> {
        let n = usize::try_from(self.u32(what)?).map_err(|_| ProtoError::BadField { what })?;
        let need = n
            .checked_mul(min_item)
            .ok_or(ProtoError::BadField { what })?;
        if n > max || need > self.rest.len() {
            return Err(ProtoError::BadField { what });
        }
        Ok(n)
    }

    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, ProtoError> {
        let n = self.len(what, max, 1)?;
        Ok(self.take(what, n)?.to_vec())
    }

    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, ProtoError> {
        let n = self.len(what, max, 1)?;
        let raw = self.take(what, n)?;
        let s = std::str::from_utf8(raw).map_err(|_| ProtoError::BadField { what })?;
        Ok(s.to_owned())
    }

    /// A list of at most `max` items, each at least `min_item` bytes long when
    /// encoded, read by `item`. The count is checked before any allocation.
    pub fn list<T>(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Vec<T>, ProtoError> {
        let n = self.len(what, max, min_item.max(1))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    /// An option: tag 0 (absent) or 1 followed by the value read by `some`.
    pub fn option<T>(
        &mut self,
        what: &'static str,
        some: impl FnOnce(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Option<T>, ProtoError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => some(self).map(Some),
            _ => Err(ProtoError::BadField { what }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_little_endian() {
        let mut e = Encoder::new();
        e.u16(0x0102);
        e.u32(0x0304_0506);
        e.u64(0x0708_090a_0b0c_0d0e);
        e.i32(-2);
        assert_eq!(
            e.into_bytes(),
            [2, 1, 6, 5, 4, 3, 0xe, 0xd, 0xc, 0xb, 0xa, 9, 8, 7, 0xfe, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn string_is_length_prefixed_utf8() {
        let mut e = Encoder::new();
        e.str("s", "hé", 16).unwrap();
        let bytes = e.into_bytes();
        assert_eq!(bytes, [3, 0, 0, 0, b'h', 0xc3, 0xa9]);

        let mut d = Decoder::new(&bytes);
        assert_eq!(d.string("s", 16).unwrap(), "hé");
        d.finish(0).unwrap();
    }

    #[test]
    fn invalid_utf8_is_a_bad_field() {
        let mut d = Decoder::new(&[2, 0, 0, 0, 0xc3, 0x28]);
        assert!(matches!(
            d.string("s", 16),
            Err(ProtoError::BadField { what: "s" })
        ));
    }

    #[test]
    fn string_over_its_cap_is_refused_both_ways() {
        let mut e = Encoder::new();
        assert!(matches!(
            e.str("s", "abcde", 4),
            Err(ProtoError::BadField { what: "s" })
        ));

        let mut d = Decoder::new(&[5, 0, 0, 0, b'a', b'b', b'c', b'd', b'e']);
        assert!(matches!(
            d.string("s", 4),
            Err(ProtoError::BadField { what: "s" })
        ));
    }

    #[test]
    fn length_past_the_end_is_a_bad_field() {
        let mut d = Decoder::new(&[9, 0, 0, 0, b'a']);
        assert!(matches!(
            d.bytes("b", 100),
            Err(ProtoError::BadField { what: "b" })
        ));
    }

    #[test]
    fn huge_count_is_refused_before_allocating() {
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        let r = d.list("l", usize::MAX, 4, |d| d.u32("x"));
        assert!(matches!(r, Err(ProtoError::BadField { what: "l" })));
    }

    #[test]
    fn count_is_checked_against_minimal_item_size() {
        // Two u32 items need 8 bytes; only 7 follow.
        let mut d = Decoder::new(&[2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0]);
        let r = d.list("l", 10, 4, |d| d.u32("x"));
        assert!(matches!(r, Err(ProtoError::BadField { what: "l" })));
    }

    #[test]
    fn bool_and_option_tags_other_than_0_1_are_bad() {
        assert!(matches!(
            Decoder::new(&[2]).bool("b"),
            Err(ProtoError::BadField { what: "b" })
        ));
        let r = Decoder::new(&[2, 0]).option("o", |d| d.u8("x"));
        assert!(matches!(r, Err(ProtoError::BadField { what: "o" })));
    }

    #[test]
    fn option_round_trips() {
        let mut e = Encoder::new();
        e.option(None::<&u32>, |e, v| {
            e.u32(*v);
            Ok(())
        })
        .unwrap();
        e.option(Some(&7u32), |e, v| {
            e.u32(*v);
            Ok(())
        })
        .unwrap();
        let bytes = e.into_bytes();
        assert_eq!(bytes, [0, 1, 7, 0, 0, 0]);

        let mut d = Decoder::new(&bytes);
        assert_eq!(d.option("o", |d| d.u32("x")).unwrap(), None);
        assert_eq!(d.option("o", |d| d.u32("x")).unwrap(), Some(7));
        d.finish(0).unwrap();
    }

    #[test]
    fn leftover_bytes_are_trailing() {
        let mut d = Decoder::new(&[1, 2, 3]);
        d.u8("a").unwrap();
        assert!(matches!(
            d.finish(9),
            Err(ProtoError::TrailingBytes { kind: 9, extra: 2 })
        ));
    }
}
