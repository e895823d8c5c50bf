"""The few Kubernetes calls the controller and the agents make, on cluster-scoped custom
resources, through the `kubernetes` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from csi_vduse.cluster.resources import GROUP, VERSION
from csi_vduse.errors import Unavailable

Object = dict[str, Any]


class Gone(Exception):
    """A watch's resourceVersion is too old: list again."""


def connect(kubeconfig: Path | None) -> client.ApiClient:
    """In-cluster credentials (the pod's token), or a kubeconfig file."""
    if kubeconfig is not None:
        api_client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig)
        )
        return api_client
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


class Resources:
    def __init__(self, api_client: client.ApiClient, timeout: float = 15.0) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.timeout = timeout

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(GROUP, VERSION, *args, _request_timeout=self.timeout, **kwargs)
        except ApiException as e:
            if e.status in (404, 409, 422):
                raise
            raise Unavailable(f"Kubernetes API: {e.status} {e.reason}") from None
        except (OSError, HTTPError) as e:  # connection refused, reset, timed out
            raise Unavailable(f"Kubernetes API unreachable: {e}") from None

    def get(self, plural: str, name: str) -> Object | None:
        try:
            obj: Object = self._call(self.api.get_cluster_custom_object, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise Unavailable(f"Kubernetes API: {e.status} {e.reason}") from None
        return obj

    def create(self, plural: str, obj: Object) -> Object | None:
        """The new object, or None when one of that name exists."""
        try:
            created: Object = self._call(self.api.create_cluster_custom_object, plural, obj)
        except ApiException as e:
            if e.status == 409:
                return None
            raise Unavailable(f"Kubernetes API refused {plural}: {e.status} {e.body}") from None
        return created

    def patch(self, plural: str, name: str, patch: Object, status: bool = False) -> Object | None:
        """A merge patch; None when the object is gone."""
        fn = (
            self.api.patch_cluster_custom_object_status
            if status
            else self.api.patch_cluster_custom_object
        )
        try:
            patched: Object = self._call(fn, plural, name, patch)
        except ApiException as e:
            if e.status == 404:
                return None
            raise Unavailable(f"Kubernetes API refused a patch: {e.status} {e.body}") from None
        return patched

    def delete(self, plural: str, name: str) -> None:
        try:
            self._call(self.api.delete_cluster_custom_object, plural, name)
        except ApiException as e:
            if e.status != 404:
                raise Unavailable(f"Kubernetes API: {e.status} {e.reason}") from None

    def list(self, plural: str, label_selector: str = "") -> tuple[list[Object], str]:
        """Every object (matching the selector) and the list's resourceVersion."""
        result = self._call(
            self.api.list_cluster_custom_object, plural, label_selector=label_selector
        )
        return list(result["items"]), str(result["metadata"]["resourceVersion"])

    def watch(
        self, plural: str, label_selector: str, resource_version: str, seconds: int
    ) -> Iterator[tuple[str, Object]]:
        """Changes after `resource_version` for up to `seconds`; Gone when it expired."""
        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            self.api.list_cluster_custom_object, GROUP, VERSION, plural,
            label_selector=label_selector, resource_version=resource_version,
            timeout_seconds=seconds, allow_watch_bookmarks=False,
        )  # fmt: skip
        try:
            for event in stream:
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise Unavailable(f"watch of {plural}: {obj.get('message')}")
                yield kind, obj
        except ApiException as e:
            if e.status == 410:
                raise Gone() from None
            raise Unavailable(f"watch of {plural}: {e.status} {e.reason}") from None
        except (OSError, HTTPError) as e:
            raise Unavailable(f"watch of {plural}: {e}") from None
