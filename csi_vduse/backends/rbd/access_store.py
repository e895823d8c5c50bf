"""How a node reaches a staged RBD volume's pool: the node-stage secret, kept (root only)
in the state dir from NodeStageVolume until NodeUnstageVolume, because a restarted plugin
must open the image again and the CO sends the secret only with NodeStageVolume."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from csi_vduse.backends.rbd.cluster import RbdAccess
from csi_vduse.state.atomic import remove_durably, write_atomic
from csi_vduse.state.records import UnreadableRecord
from csi_vduse.state.volumes import check_volume_id


class CephAccessStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "ceph-access"

    def _path(self, volume_id: str) -> Path:
        check_volume_id(volume_id)
        return self.root / f"{volume_id}.json"

    def put(self, volume_id: str, access: RbdAccess) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {**access.model_dump(), "key": access.key.get_secret_value()}
        write_atomic(self._path(volume_id), json.dumps(data).encode())  # mode 0600

    def get(self, volume_id: str) -> RbdAccess:
        path = self._path(volume_id)
        try:
            return RbdAccess.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise UnreadableRecord(
                path, "no ceph access kept for it; NodeStageVolume brings it"
            ) from None
        except ValidationError as e:
            raise UnreadableRecord(path, f"invalid: {e.error_count()} problem(s)") from None

    def delete(self, volume_id: str) -> None:
        remove_durably(self._path(volume_id))
