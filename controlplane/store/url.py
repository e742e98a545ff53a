"""``--store`` URLs: which backend holds the state.

    sqlite:///var/lib/bluegreen/state.db          one process (the default; same as --state PATH)
    etcd://10.0.0.1:2379,10.0.0.2:2379/bluegreen  any number of replicas; keys under /bluegreen/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import ConfigError
from .etcd import DEFAULT_PREFIX, EtcdStore, open_etcd_store
from .sqlite import SQLiteStore, open_sqlite_store


@dataclass(frozen=True)
class SQLiteURL:
    path: Path

    def describe(self) -> str:
        return f"sqlite {self.path}"


@dataclass(frozen=True)
class EtcdURL:
    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX

    def describe(self) -> str:
        return f"etcd {','.join(self.endpoints)} prefix {self.prefix}"


StoreURL = Union[SQLiteURL, EtcdURL]


def parse_store_url(url: str) -> StoreURL:
    """Parse a ``--store`` value; ConfigError names what is wrong."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path == "/":
            raise ConfigError(f"--store {url!r}: a SQLite URL names an absolute file, e.g. sqlite:///var/lib/bluegreen/state.db")
        return SQLiteURL(Path(path))
    if url.startswith("etcd://"):
        rest = url[len("etcd://"):]
        hosts, slash, prefix = rest.partition("/")
        endpoints = tuple(h.strip() for h in hosts.split(",") if h.strip())
        if not endpoints:
            raise ConfigError(f"--store {url!r}: name at least one etcd endpoint, e.g. etcd://127.0.0.1:2379")
        for endpoint in endpoints:
            host, colon, port = endpoint.rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--store {url!r}: etcd endpoint {endpoint!r} is not HOST:PORT")
        prefix = "/" + prefix.strip("/") + "/" if slash and prefix.strip("/") else DEFAULT_PREFIX
        return EtcdURL(endpoints, prefix)
    raise ConfigError(f"--store {url!r}: unknown scheme; use sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...][/prefix]")


async def open_store(url: StoreURL, *, lock: bool = True) -> SQLiteStore | EtcdStore:
    if isinstance(url, SQLiteURL):
        return await open_sqlite_store(url.path, lock=lock)
    return await open_etcd_store(list(url.endpoints), url.prefix)
