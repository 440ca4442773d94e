"""Pod Security Standards, "restricted" profile, and the resource rules quota namespaces apply: checks of a
pod spec as the API server's PodSecurity admission would make them, written from the documented rules
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, policy version "latest").

    from tests.support.pod_security import restricted_violations, resource_violations, pod_specs
    for where, spec in pod_specs(manifests):
        assert not restricted_violations(spec), where

Each check returns human-readable violations (empty: the pod passes), so a failing test says what and where.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Baseline: capabilities a container may add.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
        "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
# Restricted: the only volume types allowed.
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(key) or []]


def pod_specs(manifests: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """("Kind/name", pod spec) of every pod-making object (a CronJob's through its Job template)."""
    out = []
    for m in manifests:
        where = f"{m.get('kind')}/{m.get('metadata', {}).get('name')}"
        if m.get("kind") in POD_KINDS:
            out.append((where, m["spec"]["template"]["spec"]))
        elif m.get("kind") == "CronJob":
            out.append((where, m["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif m.get("kind") == "Pod":
            out.append((where, m["spec"]))
    return out


def _baseline(pod: Mapping[str, Any], annotations: Mapping[str, str]) -> list[str]:
    out = []
    pod_sc = pod.get("securityContext") or {}
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"pod: {key}")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"volume {volume.get('name')}: hostPath")
    for key, value in annotations.items():
        apparmor = key.startswith("container.apparmor.security.beta.kubernetes.io/")
        if apparmor and value != "runtime/default" and not value.startswith("localhost/"):
            out.append(f"annotation {key}={value}")
    for name in {s.get("name") for s in pod_sc.get("sysctls") or []} - SAFE_SYSCTLS:
        out.append(f"pod: sysctl {name}")
    contexts = [("pod", pod_sc)] + [
        (f"container {c.get('name')}", c.get("securityContext") or {}) for c in containers(pod)
    ]
    for where, sc in contexts:
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{where}: appArmorProfile {sc['appArmorProfile']['type']}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"{where}: seLinuxOptions {selinux}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: seccompProfile Unconfined")
    for c in containers(pod):
        name, sc = c.get("name"), c.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"container {name}: windowsOptions.hostProcess")
        if sc.get("privileged"):
            out.append(f"container {name}: privileged")
        for cap in set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES:
            out.append(f"container {name}: adds capability {cap}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"container {name}: procMount {sc['procMount']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"container {name}: hostPort {port['hostPort']}")
    return out


def restricted_violations(pod: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> list[str]:
    """What PodSecurity admission at level "restricted" would refuse in this pod spec."""
    out = _baseline(pod, annotations or {})
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume.get('name')}: type {sorted(kinds - RESTRICTED_VOLUMES)}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    for c in containers(pod):
        name, sc = c.get("name"), c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"container {name}: allowPrivilegeEscalation must be false")
        # runAsNonRoot: the container's own setting wins; unset there, the pod's must be true.
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"container {name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"container {name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(
                f"container {name}: seccompProfile must be RuntimeDefault or Localhost (pod or container)"
            )
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"container {name}: capabilities must drop ALL")
        for cap in set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"container {name}: adds capability {cap} (restricted allows NET_BIND_SERVICE only)")
    return out


def resource_violations(pod: Mapping[str, Any]) -> list[str]:
    """Containers without CPU and memory requests or without a memory limit (quota namespaces refuse them,
    and a pod without requests is BestEffort: the first a node evicts)."""
    out = []
    for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        resources = c.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in requests:
                out.append(f"container {c.get('name')}: no {key} request")
        if "memory" not in limits:
            out.append(f"container {c.get('name')}: no memory limit")
    return out


def qos_class(pod: Mapping[str, Any]) -> str:
    """The pod's QoS class as the kubelet computes it (cpu and memory only)."""
    regular = pod.get("containers") or []
    specs = [(c.get("resources") or {}) for c in [*regular, *(pod.get("initContainers") or [])]]
    if not any(r.get("requests") or r.get("limits") for r in specs):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k) is not None
        and (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k)) == (r.get("limits") or {}).get(k)
        for r in specs
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"
