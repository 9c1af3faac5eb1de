//! Channel names and subscribe patterns.
//!
//! A channel name is one to eight dot-separated segments of ASCII letters, digits, `_`, `-` and
//! `:`, at most [`MAX_CHANNEL_LEN`] bytes. A publication from device `D` with groups `G…` is routed
//! to `devices.D`, [`FLEET`] and `groups.G` for each group.

/// The channel every publication is routed to.
pub const FLEET: &str = "fleet";
/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;
const MAX_SEGMENTS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty or longer than {MAX_CHANNEL_LEN} bytes")]
    Length,
    #[error("channel name has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    #[error("channel segment `{0}` is empty or has characters other than A-Z a-z 0-9 _ - :")]
    Segment(String),
}

/// Whether `s` may stand as one segment of a channel name (and so as a device id or group name).
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'))
}

/// Checks a channel name against the grammar above.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::Length);
    }
    let mut count = 0;
    for segment in name.split('.') {
        count += 1;
        if count > MAX_SEGMENTS {
            return Err(ChannelError::TooManySegments);
        }
        if !is_valid_segment(segment) {
            return Err(ChannelError::Segment(segment.to_owned()));
        }
    }
    Ok(())
}

/// The channel of one device's readings.
pub fn device_channel(device: &str) -> String {
    format!("devices.{device}")
}

/// The channel of one group's readings.
pub fn group_channel(group: &str) -> String {
    format!("groups.{group}")
}

/// Every channel a publication of `device` in `groups` goes to, each once, in the order they are
/// appended (a group named twice in a token is still one channel).
pub fn publication_channels(device: &str, groups: &[String]) -> Vec<String> {
    let mut channels = Vec::with_capacity(2 + groups.len());
    channels.push(device_channel(device));
    channels.push(FLEET.to_owned());
    for group in groups {
        let channel = group_channel(group);
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    channels
}

/// A subscribe permission such as `devices.*`: `*` matches exactly one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPattern {
    segments: Vec<Option<String>>,
}

impl ChannelPattern {
    pub fn parse(pattern: &str) -> Result<Self, ChannelError> {
        // Validate as a name with `*` standing for a valid segment.
        validate(&pattern.replace('*', "x"))?;
        let segments = pattern
            .split('.')
            .map(|s| match s {
                "*" => Ok(None),
                s if s.contains('*') => Err(ChannelError::Segment(s.to_owned())),
                s => Ok(Some(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { segments })
    }

    pub fn matches(&self, channel: &str) -> bool {
        let mut parts = channel.split('.');
        for segment in &self.segments {
            match (segment, parts.next()) {
                (_, None) => return false,
                (None, Some(_)) => {}
                (Some(lit), Some(part)) if lit == part => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

impl std::fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(s.as_deref().unwrap_or("*"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_goes_to_each_channel_once() {
        let groups = [
            "north".to_string(),
            "south".to_string(),
            "north".to_string(),
        ];
        assert_eq!(
            publication_channels("pi-1", &groups),
            ["devices.pi-1", "fleet", "groups.north", "groups.south"]
        );
    }

    #[test]
    fn names_follow_the_grammar() {
        assert!(validate("fleet").is_ok());
        assert!(validate("devices.pi-01").is_ok());
        assert!(validate("groups.site:north").is_ok());
        assert_eq!(validate(""), Err(ChannelError::Length));
        assert!(validate("devices..x").is_err());
        assert!(validate("devices.x y").is_err());
        assert!(validate("a.b.c.d.e.f.g.h.i").is_err());
        assert!(validate(&"x".repeat(129)).is_err());
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        let p = ChannelPattern::parse("devices.*").unwrap();
        assert!(p.matches("devices.pi-01"));
        assert!(!p.matches("devices"));
        assert!(!p.matches("devices.pi-01.cpu"));
        assert!(!p.matches("fleet"));
        assert!(ChannelPattern::parse("*").unwrap().matches("fleet"));
        assert!(!ChannelPattern::parse("*").unwrap().matches("devices.x"));
        assert!(ChannelPattern::parse("dev*").is_err());
        assert_eq!(
            ChannelPattern::parse("groups.*").unwrap().to_string(),
            "groups.*"
        );
    }

    #[test]
    fn a_publication_goes_to_its_device_the_fleet_and_its_groups() {
        let channels = publication_channels("pi-7", &["north".into(), "lab".into()]);
        assert_eq!(
            channels,
            ["devices.pi-7", "fleet", "groups.north", "groups.lab"]
        );
    }
}
