//! AWS-style credentials files (`[profile]` sections of `key = value`), the
//! one place besides the environment that secrets may come from.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why no credentials could be had.
#[derive(Debug, Error)]
pub enum CredentialsError {
    /// Neither the environment nor the credentials file has a key pair.
    #[error(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to \
         ~/.aws/credentials (or the file AWS_SHARED_CREDENTIALS_FILE names)"
    )]
    Missing,
    /// The credentials file exists but could not be read.
    #[error("cannot read credentials file {path}")]
    Read {
        /// The credentials file.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// The credentials file lacks the profile or one of its two keys.
    #[error(
        "credentials file {path} has no [{profile}] section with aws_access_key_id and aws_secret_access_key"
    )]
    NoProfile {
        /// The credentials file read.
        path: PathBuf,
        /// The profile looked for (`AWS_PROFILE`, else `default`).
        profile: String,
    },
}

/// An access key pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// AWS access key id (public half).
    pub access_key_id: String,
    /// AWS secret access key (private half).
    pub secret_access_key: String,
    /// Session token of temporary credentials, if any.
    pub session_token: Option<String>,
}

/// The credentials file AWS tools use: `$AWS_SHARED_CREDENTIALS_FILE`, else
/// `~/.aws/credentials`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials"))
}

/// Reads the profile `$AWS_PROFILE` (default `default`) from the default file.
pub fn from_file() -> Result<Option<Credentials>, CredentialsError> {
    let Some(path) = default_path() else {
        return Ok(None);
    };
    if !path.exists() {
        return Ok(None);
    }
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    read(&path, &profile).map(Some)
}

/// Reads one profile from a credentials file.
pub fn read(path: &Path, profile: &str) -> Result<Credentials, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, profile).ok_or_else(|| CredentialsError::NoProfile {
        path: path.to_owned(),
        profile: profile.to_owned(),
    })
}

/// Parses one profile out of an INI-style credentials file.
pub fn parse(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_profiles() {
        let text = "# comment\n[other]\naws_access_key_id = A\naws_secret_access_key = B\n\n[default]\naws_access_key_id=K\n aws_secret_access_key = S \n";
        assert_eq!(
            parse(text, "default"),
            Some(Credentials {
                access_key_id: "K".into(),
                secret_access_key: "S".into(),
                session_token: None
            })
        );
        assert_eq!(
            parse(text, "other").map(|c| c.access_key_id),
            Some("A".into())
        );
        assert_eq!(parse(text, "missing"), None);
        assert_eq!(parse("[default]\naws_access_key_id=K\n", "default"), None);
    }
}
