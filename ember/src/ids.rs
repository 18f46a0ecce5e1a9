//! Feature ids on the wire.

/// Feature UUIDs tied to one SAE: the first 80 bits come from the SAE's SHA-256, the last 48
/// are the latent's index, so an id names one latent of one SAE (the Goodfire SDK's
/// `features/?feature_id=` lookup carries no model), is stable across runs, and parses back
/// without a table. The version and variant nibbles make it a well-formed v4 UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureIds {
    /// The 20 hex digits before the index, with the version and variant nibbles set.
    prefix: String,
}

impl FeatureIds {
    /// Ids for the SAE whose file has this SHA-256 (hex; only the first 18 digits are used).
    pub fn new(sae_sha256: &str) -> Self {
        let hex: String = sae_sha256
            .chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .chain(std::iter::repeat('0'))
            .take(18)
            .collect();
        Self {
            prefix: format!("{}4{}8{}", &hex[..12], &hex[12..15], &hex[15..18]),
        }
    }

    /// The lowercase dashed UUID of latent `index`.
    pub fn uuid(&self, index: u32) -> String {
        let p = &self.prefix;
        format!("{}-{}-{}-{}-{index:012x}", &p[..8], &p[8..12], &p[12..16], &p[16..20])
    }

    /// The latent a UUID names, in any form the SDK sends (dashed or 32 hex digits, any
    /// case); `None` for a malformed id or one of another SAE.
    pub fn parse(&self, id: &str) -> Option<u32> {
        let hex: String = id.chars().filter(|&c| c != '-').collect::<String>().to_ascii_lowercase();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) || !hex.starts_with(&self.prefix) {
            return None;
        }
        u32::try_from(u64::from_str_radix(&hex[20..], 16).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_ids_name_one_latent_of_one_sae() {
        let ids = FeatureIds::new("b179c9523d0e6a0f98a330c7562b682750a6f8c8");
        let id = ids.uuid(300);
        assert_eq!(id, "b179c952-3d0e-46a0-8f98-00000000012c");
        assert_eq!(ids.parse(&id), Some(300));
        assert_eq!(ids.parse(&id.replace('-', "").to_uppercase()), Some(300));
        assert_eq!(FeatureIds::new("00ff").parse(&id), None, "another SAE's id");
        for bad in ["", "not-a-uuid", &id[..35], &format!("{id}0")] {
            assert_eq!(ids.parse(bad), None, "{bad:?}");
        }
    }
}
