"""The chart's wiring, run for real: the container spec of the rendered StatefulSet (image,
environment, ports, user, read-only root, readiness probe) is started as two replicas on the
Docker engine, named as the StatefulSet names its pods, next to Redis, mock-ews and
mock-creatio containers on a private network. They become ready, share the mailboxes, and a
mail injected into mock-ews reaches mock-creatio. What is rendered is what runs.

Expects the images ci/image-check.sh builds (exchange-listener:check and
exchange-listener-redis:check) and builds the mocks' images the same way."""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import helm_python as helm
import yaml

RUN = f"elchart{os.getpid()}"
NET = RUN
started = []
folders = []


def sh(*args, capture=True):
    done = subprocess.run(args, capture_output=capture, text=True)
    if done.returncode != 0:
        raise SystemExit(f"chart-run: {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip() if capture else ""


def creatio_json(value):
    """A body as Creatio's Json.NET writes it (QuoteName = false): names unquoted."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{creatio_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(creatio_json(v) for v in value) + "]"
    return json.dumps(value)


def http(method, url, body=None, creatio=False, token=None):
    if body is None:
        data = None
    else:
        data = (creatio_json(body) if creatio else json.dumps(body)).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
            return resp.status, (json.loads(text) if text.startswith(("{", "[")) else text)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def eventually(what, probe, patience=60):
    deadline = time.time() + patience
    while time.time() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"chart-run: timed out waiting for {what}")


def image(binary, tag):
    """An image of one of the workspace's release binaries, staged like the listener's."""
    ctx = f"target/image/{binary}"
    sh("ci/stage-rootfs.sh", f"target/release/{binary}", ctx)
    with open(f"{ctx}/Dockerfile", "w") as f:
        f.write(f'FROM scratch\nCOPY rootfs/ /\nUSER 10001:10001\n'
                f'ENTRYPOINT ["/usr/local/bin/{binary}"]\n')
    sh("docker", "build", "-q", "-t", tag, ctx)


def run(name, img, *args, alias=None, publish=None, env=(), user=None, read_only=False,
        volumes=()):
    cmd = ["docker", "run", "-d", "--name", name, "--network", NET,
           "--network-alias", alias or name]
    for host, inside in volumes:
        cmd += ["-v", f"{host}:{inside}:ro"]
    if publish:
        cmd += ["-p", f"127.0.0.1::{publish}"]
    for k, v in env:
        cmd += ["-e", f"{k}={v}"]
    if user:
        cmd += ["--user", user]
    if read_only:
        cmd += ["--read-only"]
    sh(*cmd, img, *args)
    started.append(name)
    if publish:
        return "http://" + sh("docker", "port", name, f"{publish}/tcp").splitlines()[0]
    return None


def main():
    sh("ci/release-build.sh")
    image("mock-ews", "exchange-listener-mock-ews:check")
    image("mock-creatio", "exchange-listener-mock-creatio:check")

    values = helm.parse_set_string(
        "image.repository=exchange-listener,image.tag=check,env.host=redis,replicaCount=2,ApiUrl=crm.example.com,"
        "ingress.enabled=true,ingress.path=/exchangelistener,leaseMs=1500,creatio.hosts={mock-creatio}")
    files = helm.Chart.load("helm/exchangelistener").render(values, name="el", namespace="crm",
                                                           is_install=True)
    objects = [d for p, t in files.items() if not p.endswith("NOTES.txt")
               for d in yaml.safe_load_all(t) if d]
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    pod = sts["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    port = spec["ports"][0]["containerPort"]
    ready_path = spec["readinessProbe"]["httpGet"]["path"]
    user = f'{pod["securityContext"]["runAsUser"]}:{pod["securityContext"]["runAsGroup"]}'
    read_only = spec["securityContext"]["readOnlyRootFilesystem"]

    sh("docker", "network", "create", NET)
    run(f"{RUN}-redis", "exchange-listener-redis:check", alias="redis")
    ews = run(f"{RUN}-ews", "exchange-listener-mock-ews:check", "--listen", "0.0.0.0:7070",
              alias="mock-ews", publish=7070)
    creatio = run(f"{RUN}-creatio", "exchange-listener-mock-creatio:check", "--listen",
                  "0.0.0.0:7080", alias="mock-creatio", publish=7080)

    # The Secrets the pod mounts, as files the container's user can read.
    volumes = []
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        secret_name = by_name[mount["name"]]["secret"]["secretName"]
        folder = tempfile.mkdtemp(prefix=f"{RUN}-{mount['name']}-")
        folders.append(folder)
        os.chmod(folder, 0o755)
        for key, value in secrets[secret_name]["data"].items():
            path = os.path.join(folder, key)
            with open(path, "wb") as f:
                f.write(base64.b64decode(value))
            os.chmod(path, 0o644)
        volumes.append((folder, mount["mountPath"]))
    token = base64.b64decode(secrets["el-exchangelistener-api-token"]["data"]["token"]).decode()

    bases = []
    for i in range(sts["spec"]["replicas"]):
        name = f'{sts["metadata"]["name"]}-{i}'
        env = []
        for e in spec["env"]:
            if "value" in e:
                env.append((e["name"], e["value"]))
            elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env.append((e["name"], name))
            elif "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                data = secrets[ref["name"]]["data"]
                env.append((e["name"], base64.b64decode(data[ref["key"]]).decode()))
        bases.append(run(f"{RUN}-{name}", spec["image"], alias=name, publish=port, env=env,
                         user=user, read_only=read_only, volumes=volumes))
    for base in bases:
        eventually(f"{base}{ready_path}", lambda b=base: http("GET", b + ready_path)[0] == 200)
    print(f"chart-run: {len(bases)} replicas from the rendered StatefulSet are ready")
    refused = http("GET", f"{bases[0]}/api/listeners/status")[0]
    if refused != 401:
        raise SystemExit(f"chart-run: a call without the API token answered {refused}, not 401")
    print("chart-run: a call without the API token is refused (401)")

    callback = "http://mock-creatio:7080/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail"
    for i in range(4):
        email = f"user{i}@contoso.example"
        http("POST", f"{ews}/_control/mailboxes", {"email": email, "password": "secret"})
        creds = {"Id": f"mbx-{i}", "SenderEmailAddress": email, "UserName": email,
                 "Password": "secret", "AccessToken": None,
                 "ServiceUrl": "http://mock-ews:7070/EWS/Exchange.asmx", "Port": 0,
                 "UseSsl": False, "UseOAuth": False,
                 "ServerTypeId": "3490BD45-4F4D-4613-AA06-454546F3342A",
                 "BpmEndpoint": callback, "BpmUser": "Supervisor", "BpmUserWorkspace": "Default",
                 "BpmUserTimeZone": "UTC", "Context": "{UserRequested:false,HasError:false}",
                 "FolderIds": [], "FeatureValues": {"UseImpersonation": False}}
        # Creatio reaches the listener through the ingress path, and writes names unquoted.
        # ...the token in its path, as ExchangeListenerServiceUri carries it.
        status, _ = http("POST", f"{bases[i % 2]}/exchangelistener/{token}/api/listeners/create",
                         [creds], creatio=True)
        assert status == 200, status
    owners = eventually("four mailboxes streaming on both replicas", lambda: (
        lambda s: s["Owners"] if s["States"].get("Streaming") == 4 and len(s["Owners"]) == 2
        else None)(http("GET", f"{bases[1]}/api/listeners/status", token=token)[1]))
    print(f"chart-run: mailboxes shared {owners}")

    sent = http("POST", f"{ews}/_control/mailboxes/user3@contoso.example/messages",
                {"from": "sender@example.com", "subject": "through the chart", "body": "hi"})[1]
    eventually("the mail at mock-creatio", lambda: any(
        e.get("MessageId") == sent["message_id"]
        for c in http("GET", f"{creatio}/_control/calls?operation=ProcessFullEmail")[1]
        for e in c["body"].get("Emails", [])))
    print("chart-run: a mail injected into mock-ews reached mock-creatio")
    rolling_restart(sts, bases, token, ready_path, port)


# How long after a pod's SIGTERM calls may still reach it: Kubernetes removes a terminating
# pod's endpoint at once, but kube-proxy and ingress controllers follow about a second later.
ENDPOINT_LAG = 1.0


def rolling_restart(sts, bases, token, ready_path, port):
    """A rolling restart of the rendered pods under a client calling the API as Creatio does,
    through a 'Service' that keeps sending to a stopping pod for ENDPOINT_LAG: no call may be
    refused or fail (with drainSeconds=0, about a quarter are)."""
    endpoints = list(bases)
    lock = threading.Lock()
    outcomes = []
    done = threading.Event()

    def client():
        n = 0
        while not done.is_set():
            with lock:
                base = endpoints[n % len(endpoints)]
            n += 1
            try:
                status = http("GET", f"{base}/api/listeners/status", token=token)[0]
            except Exception as e:  # noqa: BLE001 - a refused or cut call is what is counted
                status = type(e).__name__
            outcomes.append((base, status))
            time.sleep(0.02)

    caller = threading.Thread(target=client)
    caller.start()
    try:
        for i, base in enumerate(bases):
            name = f'{RUN}-{sts["metadata"]["name"]}-{i}'
            started = time.time()
            stopper = threading.Thread(target=sh, args=("docker", "stop", "-t", "60", name))
            stopper.start()
            time.sleep(ENDPOINT_LAG)
            with lock:
                endpoints.remove(base)
            stopper.join()
            stopped = time.time() - started
            sh("docker", "start", name)
            # A restarted container may publish another host port.
            fresh = "http://" + sh("docker", "port", name, f"{port}/tcp").splitlines()[0]
            eventually(f"{fresh}{ready_path}", lambda: http("GET", fresh + ready_path)[0] == 200)
            with lock:
                endpoints.append(fresh)
            print(f"chart-run: pod {i} stopped in {stopped:.1f} s and is ready again "
                  f"after {time.time() - started:.1f} s")
    finally:
        done.set()
        caller.join()
    failed = [(b, s) for b, s in outcomes if s != 200]
    print(f"chart-run: rolling restart under {len(outcomes)} API calls: {len(failed)} refused or failed")
    if failed:
        raise SystemExit(f"chart-run: calls failed during the rolling restart: {failed[:5]}")


if __name__ == "__main__":
    try:
        main()
    finally:
        for name in started:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "network", "rm", NET], capture_output=True)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0)
