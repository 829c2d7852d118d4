//! Just enough of the protobuf wire format to read ObjectMeta out of
//! kube-apiserver's envelope, without the Kubernetes schemas.

/// One field as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32,
}

/// Iterates over the fields of a message; yields None after the first
/// malformed field (the caller then treats the value as undecodable).
#[derive(Debug)]
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(message: &'a [u8]) -> Self {
        Fields {
            rest: message,
            failed: false,
        }
    }

    /// True if iteration stopped at a malformed field.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, byte) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn field(&mut self) -> Option<(u64, Wire<'a>)> {
        let tag = self.varint()?;
        let number = tag >> 3;
        if number == 0 {
            return None;
        }
        let wire = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                Wire::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            // Groups (3, 4) are not used by Kubernetes' messages.
            _ => return None,
        };
        Some((number, wire))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Wire<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let field = self.field();
        if field.is_none() {
            self.failed = true;
        }
        field
    }
}

pub(crate) mod encode {
    //! A writer of the few messages the tests and `protobuf_object` need.

    pub(crate) fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(crate) fn bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }

    pub(crate) fn int(out: &mut Vec<u8>, field: u64, v: u64) {
        varint(out, field << 3);
        varint(out, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_stops_at_garbage() {
        let mut m = Vec::new();
        encode::int(&mut m, 1, 300);
        encode::bytes(&mut m, 2, b"hi");
        m.extend_from_slice(&[0x1d, 1, 2, 3, 4]); // field 3, fixed32
        let fields: Vec<_> = Fields::new(&m).collect();
        assert_eq!(
            fields,
            vec![
                (1, Wire::Varint(300)),
                (2, Wire::Bytes(b"hi")),
                (3, Wire::Fixed32)
            ]
        );
        let mut truncated = m.clone();
        encode::varint(&mut truncated, 4 << 3 | 2);
        encode::varint(&mut truncated, 10);
        let mut it = Fields::new(&truncated);
        assert_eq!(it.by_ref().count(), 3);
        assert!(it.failed());
    }
}
