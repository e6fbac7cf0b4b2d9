//! `--export` specifications: `name=os,backend=file,path=disk.img,read-only`.

use std::path::PathBuf;

use super::size::parse_size;

/// Which volume backend an export uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory {
        size: u64,
    },
    File {
        path: PathBuf,
        size: Option<u64>,
        direct: bool,
    },
}

/// One parsed `--export`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub backend: Backend,
    pub read_only: bool,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{key}={v:?}: expected true or false")),
    }
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut name = None;
        let mut backend = None;
        let mut size = None;
        let mut path = None;
        let mut read_only = false;
        let mut direct = true;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            match k {
                "name" => name = Some(v.to_owned()),
                "backend" => backend = Some(v.to_owned()),
                "size" => size = Some(parse_size(v)?),
                "path" => path = Some(PathBuf::from(v)),
                "read-only" | "readonly" | "ro" => read_only = parse_bool(k, v)?,
                "direct" => direct = parse_bool(k, v)?,
                _ => {
                    return Err(format!(
                        "unknown key {k:?} in --export {s:?}; known keys: name, backend, size, path, read-only, direct"
                    ));
                }
            }
        }
        let name = name.ok_or_else(|| format!("--export {s:?} needs name=NAME"))?;
        let backend =
            match backend
                .as_deref()
                .unwrap_or(if path.is_some() { "file" } else { "memory" })
            {
                "memory" => Backend::Memory {
                    size: size.ok_or_else(|| {
                        format!("--export {s:?}: a memory export needs size=, e.g. size=1G")
                    })?,
                },
                "file" => Backend::File {
                    path: path
                        .ok_or_else(|| format!("--export {s:?}: a file export needs path=FILE"))?,
                    size,
                    direct,
                },
                other => {
                    return Err(format!(
                        "--export {s:?}: unknown backend {other:?}; use memory or file"
                    ));
                }
            };
        Ok(ExportSpec {
            name,
            backend,
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_and_file() {
        let m: ExportSpec = "name=scratch,backend=memory,size=1G".parse().unwrap();
        assert_eq!(m.backend, Backend::Memory { size: 1 << 30 });
        assert!(!m.read_only);
        let f: ExportSpec = "name=os,backend=file,path=disk.img,read-only"
            .parse()
            .unwrap();
        assert_eq!(
            f.backend,
            Backend::File {
                path: "disk.img".into(),
                size: None,
                direct: true
            }
        );
        assert!(f.read_only);
    }

    #[test]
    fn explains_mistakes() {
        assert!(
            "backend=memory,size=1G"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("name=")
        );
        assert!(
            "name=a,backend=memory"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("size=")
        );
        assert!(
            "name=a,colour=blue"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("unknown key")
        );
        assert!(
            "name=a,backend=tape,size=1"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("unknown backend")
        );
    }
}
