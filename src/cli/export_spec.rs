//! `--export` specifications: `name=os,backend=file,path=disk.img,read-only`,
//! parsed into the [`VolumeSpec`] that the control API's volumes use too,
//! plus how the export is served besides NBD (`vhost-user=PATH`).

use std::path::PathBuf;

use vbd::control::factory::{BackendSpec, VolumeSpec};
use vbd::size::parse_size;
use vbd::volume::object::Durability;
use vbd::volume::object::cache::CacheSize;

/// One parsed `--export`: a name and the volume behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExportSpec {
    pub(crate) name: String,
    pub(crate) volume: VolumeSpec,
    /// Also serve it as a vhost-user-blk device on this socket.
    pub(crate) vhost_user: Option<PathBuf>,
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
        let mut store = None;
        let mut volume = None;
        let mut cache = CacheSize::Default;
        let mut vhost_user = None;
        let mut durability = Durability::Local;
        let mut take_over = false;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            match k {
                "name" => name = Some(v.to_owned()),
                "backend" => backend = Some(v.to_owned()),
                "size" => size = Some(parse_size(v).map_err(|e| e.to_string())?),
                "path" => path = Some(PathBuf::from(v)),
                "read-only" | "readonly" | "ro" => read_only = parse_bool(k, v)?,
                "direct" => direct = parse_bool(k, v)?,
                "store" => store = Some(v.to_owned()),
                "volume" => volume = Some(v.to_owned()),
                "vhost-user" if !v.is_empty() => vhost_user = Some(PathBuf::from(v)),
                "vhost-user" => {
                    return Err(format!(
                        "--export {s:?}: vhost-user= needs the socket path, e.g. vhost-user=/run/vbd/os.vhost"
                    ));
                }
                "durability" => durability = v.parse()?,
                "take-over" | "take_over" => take_over = parse_bool(k, v)?,
                "cache" => {
                    cache = match v {
                        "auto" => CacheSize::Auto,
                        "default" => CacheSize::Default,
                        _ => CacheSize::Bytes(parse_size(v).map_err(|e| e.to_string())?),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown key {k:?} in --export {s:?}; known keys: name, backend, size, path, read-only, direct, store, volume, cache, durability, take-over, vhost-user"
                    ));
                }
            }
        }
        let name = name.ok_or_else(|| format!("--export {s:?} needs name=NAME"))?;
        let default = if path.is_some() {
            "file"
        } else if store.is_some() {
            "object"
        } else {
            "memory"
        };
        let backend =
            match backend.as_deref().unwrap_or(default) {
                "memory" => BackendSpec::Memory {
                    size: size.ok_or_else(|| {
                        format!("--export {s:?}: a memory export needs size=, e.g. size=1G")
                    })?,
                },
                "file" => BackendSpec::File {
                    path: path
                        .ok_or_else(|| format!("--export {s:?}: a file export needs path=FILE"))?,
                    size,
                    direct,
                },
                "object" => BackendSpec::Object {
                    store: Some(store.ok_or_else(|| {
                        format!("--export {s:?}: an object export needs store=URL")
                    })?),
                    volume: volume.unwrap_or_else(|| name.clone()),
                    cache,
                    create: size,
                    durability,
                    take_over,
                },
                other => {
                    return Err(format!(
                        "--export {s:?}: unknown backend {other:?}; use memory, file or object"
                    ));
                }
            };
        Ok(ExportSpec {
            name,
            volume: VolumeSpec { backend, read_only },
            vhost_user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_and_file() {
        let m: ExportSpec = "name=scratch,backend=memory,size=1G".parse().unwrap();
        assert_eq!(m.volume.backend, BackendSpec::Memory { size: 1 << 30 });
        assert!(!m.volume.read_only);
        let f: ExportSpec = "name=os,backend=file,path=disk.img,read-only"
            .parse()
            .unwrap();
        assert_eq!(
            f.volume.backend,
            BackendSpec::File {
                path: "disk.img".into(),
                size: None,
                direct: true
            }
        );
        assert!(f.volume.read_only);
    }

    #[test]
    fn vhost_user_names_a_socket() {
        let e: ExportSpec = "name=os,backend=file,path=os.img,vhost-user=/run/vbd/os.vhost"
            .parse()
            .unwrap();
        assert_eq!(e.vhost_user, Some(PathBuf::from("/run/vbd/os.vhost")));
        assert!(matches!(e.volume.backend, BackendSpec::File { .. }));
        let plain: ExportSpec = "name=a,size=1M".parse().unwrap();
        assert_eq!(plain.vhost_user, None);
        let err = "name=a,size=1M,vhost-user"
            .parse::<ExportSpec>()
            .unwrap_err();
        assert!(err.contains("socket path"), "{err}");
    }

    #[test]
    fn parses_object() {
        let o: ExportSpec = "name=os,backend=object,store=file:///s,cache=auto"
            .parse()
            .unwrap();
        assert_eq!(
            o.volume.backend,
            BackendSpec::Object {
                store: Some("file:///s".into()),
                volume: "os".into(),
                cache: CacheSize::Auto,
                create: None,
                durability: Durability::Local,
                take_over: false,
            }
        );
        let o: ExportSpec = "name=a,store=s3://b,volume=v,cache=64M,size=1T"
            .parse()
            .unwrap();
        assert_eq!(
            o.volume.backend,
            BackendSpec::Object {
                store: Some("s3://b".into()),
                volume: "v".into(),
                cache: CacheSize::Bytes(64 << 20),
                create: Some(1 << 40),
                durability: Durability::Local,
                take_over: false,
            }
        );
        let o: ExportSpec = "name=a,store=s3://b,durability=store,take-over"
            .parse()
            .unwrap();
        assert!(matches!(
            o.volume.backend,
            BackendSpec::Object {
                durability: Durability::Store,
                take_over: true,
                ..
            }
        ));
        assert!(
            "name=a,store=s3://b,durability=disk"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("local or store")
        );
        assert!(
            "name=a,backend=object"
                .parse::<ExportSpec>()
                .unwrap_err()
                .contains("store=")
        );
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
