"""The Helm chart, checked offline: rendered with representative value sets, every object
validated against the Kubernetes schemas, and each of the original chart's values shown to
change the output the way its table says. Run by ci/test.sh with helm-python-sdk and
kubernetes-validate from PyPI; exits non-zero naming the first broken expectation."""

import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = "helm/exchangelistener"
KUBE = "1.30"
# Kinds whose schemas belong to operators, not to Kubernetes.
CUSTOM = {"ScaledObject", "ServiceMonitor"}

chart = helm.Chart.load(CHART)
failures = []


def render(expression="", name="el", namespace="crm"):
    values = helm.parse_set_string(expression) if expression else {}
    files = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects, files


def notes(files):
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    return found[0] if found else None


def container(objects):
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def env(objects, name):
    for e in container(objects)["env"]:
        if e["name"] == name:
            return e.get("value", e.get("valueFrom"))
    return None


def expect(what, ok):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


# Every value set renders, and every rendered object is valid Kubernetes.
VALUE_SETS = {
    "defaults, one replica": "replicaCount=1,ApiUrl=crm.example.com",
    "Redis": "env.host=redis,ApiUrl=crm.example.com",
    "NodePort": "env.host=redis,service.type=NodePort,service.nodePort=30080,ingress.enabled=false",
    "ingress": "env.host=redis,ApiUrl=crm.example.com,ingress.path=/el",
    "autoscaling, ServiceMonitor": "env.host=redis,ApiUrl=crm.example.com,autoscaling.enabled=true,"
    "serviceMonitor.enabled=true",
    "KEDA": "env.host=redis,ApiUrl=crm.example.com,keda.enabled=true,"
    "keda.prometheusServerAddress=http://prom:9090",
    "Redis password and TLS": "env.host=redis,ApiUrl=crm.example.com,redis.passwordSecret=redis-auth,redis.tls=true,"
    "redis.caSecret=redis-ca",
    "on-premises Exchange": "env.host=redis,ApiUrl=crm.example.com,redis.caSecret=redis-ca,exchange.caSecret=ews-ca,"
    "exchange.serviceAccountsSecret=ews-accounts,exchange.auth=ntlm,creatio.hosts={crm.contoso.com}",
    "the original's command line": "env.host=redis.crm,env.port=6379,env.base=0,"
    "ApiUrl=crm.example.com,ingress.enabled=true,ingress.path=/exchangelistener,apiVersion=apps/v1",
}
for label, expression in VALUE_SETS.items():
    try:
        objects, _ = render(expression)
    except helm.HelmError as e:
        expect(f"{label}: renders ({e})", False)
        continue
    for obj in objects:
        if obj["kind"] in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE, strict=True)
            valid = True
        except kubernetes_validate.ValidationError as e:
            print(e)
            valid = False
        expect(f"{label}: {obj['kind']} {obj['metadata']['name']} is valid Kubernetes {KUBE}", valid)

# Each of the original's values does what its table says.
base, base_files = render("env.host=redis,ApiUrl=crm.example.com")
expect("replicaCount sets the StatefulSet's replicas",
       one(render("env.host=redis,ApiUrl=crm.example.com,replicaCount=5")[0], "StatefulSet")["spec"]["replicas"] == 5)
expect("apiVersion sets the StatefulSet's apiVersion",
       one(base, "StatefulSet")["apiVersion"] == "apps/v1")
expect("service.type sets the Service's type",
       one(render("env.host=redis,ApiUrl=crm.example.com,service.type=NodePort")[0], "Service")["spec"]["type"] == "NodePort")
expect("service.nodePort sets the node port",
       one(render("env.host=redis,ApiUrl=crm.example.com,service.type=NodePort,service.nodePort=30080")[0], "Service")
       ["spec"]["ports"][0].get("nodePort") == 30080)
expect("env.host and env.port become ExchangeListenerRedisHost",
       env(render("env.host=redis.crm,ApiUrl=crm.example.com,env.port=6380")[0], "ExchangeListenerRedisHost") == "redis.crm:6380")
expect("env.base becomes ExchangeListenerRedisDatabase",
       env(render("env.host=redis,ApiUrl=crm.example.com,env.base=4")[0], "ExchangeListenerRedisDatabase") == "4")
expect("no env.host: no Redis settings",
       env(render("replicaCount=1,ingress.enabled=false")[0], "ExchangeListenerRedisHost") is None)
expect("ingress.enabled=false leaves the Ingress out",
       one(render("env.host=redis,ingress.enabled=false")[0], "Ingress") is None)
ingress = one(render("env.host=redis,ApiUrl=crm.example.com,ingress.path=/el")[0], "Ingress")
expect("ApiUrl is the Ingress host", ingress["spec"]["rules"][0].get("host") == "crm.example.com")
expect("ingress.path is the Ingress path",
       ingress["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/el")
expect("ingress.path is the listener's base path",
       env(render("env.host=redis,ApiUrl=crm.example.com,ingress.path=/el")[0], "EXCHANGE_LISTENER_BASE_PATH") == "/el")
expect("log4Net.level Debug becomes the debug log level",
       env(render("env.host=redis,ApiUrl=crm.example.com,log4Net.level=Debug")[0], "EXCHANGE_LISTENER_LOG") == "debug")
expect("log4Net.level defaults to info", env(base, "EXCHANGE_LISTENER_LOG") == "info")
expect("the pod name is the replica id",
       env(base, "PodName") == {"fieldRef": {"fieldPath": "metadata.name"}})
probes = container(base)
expect("the API answers through the drain time, within the grace period",
       env(base, "EXCHANGE_LISTENER_DRAIN_SECS") == "5"
       and int(env(base, "EXCHANGE_LISTENER_DRAIN_SECS")) + int(env(base, "EXCHANGE_LISTENER_SHUTDOWN_TIMEOUT_SECS"))
       < one(base, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
expect("probes on /healthz and /readyz",
       probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
       and probes["readinessProbe"]["httpGet"]["path"] == "/readyz")
expect("the secret key comes from a Secret the chart keeps",
       one(base, "Secret")["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep")
base_notes = notes(base_files)
expect("NOTES warns GitOps users of the generated key and token, naming both values",
       "secretKey.existingSecret and apiToken.existingSecret" in base_notes)
own_secrets = notes(render("env.host=redis,ApiUrl=crm.example.com,secretKey.existingSecret=k,"
                           "apiToken.existingSecret=t")[1])
expect("no GitOps warning when both Secrets are named", "GitOps" not in own_secrets)
expect("the pods carry a checksum of the generated secrets",
       len(one(base, "StatefulSet")["spec"]["template"]["metadata"]["annotations"].get("checksum/secrets", "")) == 64)
expect("NOTES names Creatio's ExchangeListenerServiceUri, the token in its path, and how to read it",
       "http://crm.example.com/exchangelistener/<token>/api/listeners" in base_notes
       and "kubectl -n crm get secret el-exchangelistener-api-token" in base_notes)

# Exposure: a token on every call, metrics apart, a network policy.
token_secret = next(o for o in base if o["kind"] == "Secret" and o["metadata"]["name"] == "el-exchangelistener-api-token")
base_pod = one(base, "StatefulSet")["spec"]["template"]["spec"]
expect("the API token is generated once and kept",
       token_secret["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep"
       and len(__import__("base64").b64decode(token_secret["data"]["token"])) >= 16)
expect("the API token is mounted and named by --api-token-file",
       env(base, "EXCHANGE_LISTENER_API_TOKEN_FILE") == "/etc/exchange-listener/api-token/token"
       and any(v["name"] == "api-token" and v["secret"]["secretName"] == "el-exchangelistener-api-token"
               for v in base_pod["volumes"]))
own_token = render("env.host=redis,ApiUrl=crm.example.com,apiToken.existingSecret=creatio-token")[0]
expect("apiToken.existingSecret is used, none generated",
       not any(o["kind"] == "Secret" and o["metadata"]["name"].endswith("api-token") for o in own_token)
       and any(v.get("secret", {}).get("secretName") == "creatio-token"
               for v in one(own_token, "StatefulSet")["spec"]["template"]["spec"]["volumes"]))
open_api, open_files = render("env.host=redis,ApiUrl=crm.example.com,apiToken.enabled=false")
expect("apiToken.enabled=false: no token, and NOTES warns",
       env(open_api, "EXCHANGE_LISTENER_API_TOKEN_FILE") is None and "WARNING" in notes(open_files)
       and "<token>" not in notes(open_files))
api_service = next(o for o in base if o["kind"] == "Service" and o["metadata"]["name"] == "el-exchangelistener")
expect("/metrics on its own port, which the API Service and the Ingress do not carry",
       env(base, "EXCHANGE_LISTENER_METRICS_LISTEN") == "0.0.0.0:9090"
       and [p["name"] for p in api_service["spec"]["ports"]] == ["http"]
       and one(base, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["name"] == "http"
       and one(base, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9090")
policy = one(base, "NetworkPolicy")
rules = {r["ports"][0]["port"]: r["from"] for r in policy["spec"]["ingress"]} if policy else {}
expect("a NetworkPolicy by default: the API from the ingress controller, metrics from monitoring",
       rules.get("http", [{}])[0].get("namespaceSelector", {}).get("matchLabels")
       == {"kubernetes.io/metadata.name": "ingress-nginx"}
       and rules.get("metrics", [{}])[0].get("namespaceSelector", {}).get("matchLabels")
       == {"kubernetes.io/metadata.name": "monitoring"})
peers = one(render("env.host=redis,ApiUrl=crm.example.com,"
                   "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.team=crm")[0], "NetworkPolicy")
expect("networkPolicy.apiFrom admits more callers of the API",
       {"namespaceSelector": {"matchLabels": {"team": "crm"}}} in peers["spec"]["ingress"][0]["from"])
expect("networkPolicy.enabled=false leaves it out",
       one(render("env.host=redis,ApiUrl=crm.example.com,networkPolicy.enabled=false")[0], "NetworkPolicy") is None)

onprem = render("env.host=redis,ApiUrl=crm.example.com,exchange.caSecret=ews-ca,exchange.serviceAccountsSecret=ews-accounts,"
                "exchange.auth=ntlm,creatio.hosts={crm.contoso.com},exchange.hosts={mail.contoso.com,*.contoso.com}")[0]
pod = one(onprem, "StatefulSet")["spec"]["template"]["spec"]
mounts = {m["name"]: m["mountPath"] for m in container(onprem).get("volumeMounts", [])}
secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", [])}
expect("exchange.caSecret is mounted and named by --ews-ca-file",
       secrets.get("ews-ca") == "ews-ca"
       and env(onprem, "EXCHANGE_LISTENER_EWS_CA_FILE") == mounts.get("ews-ca") + "/ca.crt")
expect("exchange.serviceAccountsSecret is mounted and named by --ews-service-accounts",
       secrets.get("service-accounts") == "ews-accounts"
       and env(onprem, "EXCHANGE_LISTENER_EWS_SERVICE_ACCOUNTS")
       == mounts.get("service-accounts") + "/accounts.json")
expect("exchange.auth becomes --ews-auth", env(onprem, "EXCHANGE_LISTENER_EWS_AUTH") == "ntlm")
m365 = render("env.host=redis,ApiUrl=crm.example.com,graph.appsSecret=m365-apps,"
              "graph.notificationUrl=https://crm.example.com/exchangelistener/t/graph/notifications")[0]
graph_mounts = {m["name"]: m["mountPath"] for m in container(m365).get("volumeMounts", [])}
graph_secrets = {v["name"]: v["secret"]["secretName"]
                 for v in one(m365, "StatefulSet")["spec"]["template"]["spec"].get("volumes", [])}
expect("graph.appsSecret is mounted and named by --graph-apps",
       graph_secrets.get("graph-apps") == "m365-apps"
       and env(m365, "EXCHANGE_LISTENER_GRAPH_APPS") == graph_mounts.get("graph-apps") + "/apps.json")
expect("graph.notificationUrl becomes --graph-notification-url",
       env(m365, "EXCHANGE_LISTENER_GRAPH_NOTIFICATION_URL")
       == "https://crm.example.com/exchangelistener/t/graph/notifications")
expect("creatio.hosts becomes --creatio-hosts", env(onprem, "EXCHANGE_LISTENER_CREATIO_HOSTS") == "crm.contoso.com")
expect("exchange.hosts becomes --exchange-hosts",
       env(onprem, "EXCHANGE_LISTENER_EXCHANGE_HOSTS") == "mail.contoso.com,*.contoso.com")
sentinel = render("env.host=redis-sentinel.crm,env.port=26379,ApiUrl=crm.example.com,redis.sentinelMaster=mymaster")[0]
expect("redis.sentinelMaster names the master the sentinels at env.host watch",
       env(sentinel, "EXCHANGE_LISTENER_REDIS_SENTINEL_MASTER") == "mymaster"
       and env(sentinel, "ExchangeListenerRedisHost") == "redis-sentinel.crm:26379")
expect("no Creatio hosts named: ApiUrl's host alone, and NOTES says so",
       env(base, "EXCHANGE_LISTENER_CREATIO_HOSTS") == "crm.example.com"
       and "Mail is posted only to Creatio at: crm.example.com" in base_notes)
expect("ApiUrl with a port: its host alone",
       env(render("env.host=redis,ApiUrl=crm.example.com:8443")[0], "EXCHANGE_LISTENER_CREATIO_HOSTS")
       == "crm.example.com")
any_host = render("env.host=redis,ApiUrl=crm.example.com,creatio.hostsFromApiUrl=false")[0]
expect("creatio.hostsFromApiUrl=false and no host lists: any host",
       env(any_host, "EXCHANGE_LISTENER_CREATIO_HOSTS") is None
       and env(base, "EXCHANGE_LISTENER_EXCHANGE_HOSTS") is None)
dual = render("env.host=redis,ApiUrl=crm.example.com,listenAddress=::")[0]
expect("listenAddress :: listens on IPv6 (and IPv4), the API and metrics alike",
       env(dual, "EXCHANGE_LISTENER_LISTEN") == "[::]:8080"
       and env(dual, "EXCHANGE_LISTENER_METRICS_LISTEN") == "[::]:9090"
       and env(base, "EXCHANGE_LISTENER_LISTEN") == "0.0.0.0:8080")
expect("the default memory limit holds the default mailbox cap (it renders)",
       container(base)["resources"]["limits"]["memory"] == "768Mi")
expect("a memory limit that holds the cap renders",
       container(render("env.host=redis,ApiUrl=crm.example.com,resources.limits.memory=512Mi,"
                        "maxActiveMailboxes=8000")[0])["resources"]["limits"]["memory"] == "512Mi")
expect("no Exchange secrets: the API token's volume alone",
       [v["name"] for v in one(base, "StatefulSet")["spec"]["template"]["spec"]["volumes"]] == ["api-token"])



def restricted(objects):
    """What keeps the pod from the `restricted` Pod Security level (Kubernetes 1.30)."""
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    psc = pod.get("securityContext") or {}
    problems = []
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append("runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append("runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append("seccompProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append("capabilities")
        if sc.get("privileged"):
            problems.append("privileged")
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
               "persistentVolumeClaim", "projected", "secret"}
    for v in pod.get("volumes", []):
        if not set(v) - {"name"} <= allowed:
            problems.append(f"volume {v['name']}")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces")
    return problems


for label, expression in [("defaults", "env.host=redis,ApiUrl=crm.example.com"),
                          ("on-premises Exchange", VALUE_SETS["on-premises Exchange"])]:
    problems = restricted(render(expression)[0])
    expect(f"{label}: the pod meets the restricted Pod Security level ({problems})", not problems)
openshift = render("env.host=redis,ApiUrl=crm.example.com,podSecurityContext.runAsUser=null,"
                   "podSecurityContext.runAsGroup=null")[0]
pod_sc = one(openshift, "StatefulSet")["spec"]["template"]["spec"]["securityContext"]
expect("podSecurityContext lets the platform choose the user (OpenShift)",
       "runAsUser" not in pod_sc and pod_sc.get("runAsNonRoot") is True)
expect("no service account token in the pod",
       one(base, "StatefulSet")["spec"]["template"]["spec"].get("automountServiceAccountToken") is False)

# The conventions administrators expect of a chart.
named = render("env.host=redis,ApiUrl=crm.example.com,fullnameOverride=mail-listener")[0]
expect("fullnameOverride names every object",
       {o["metadata"]["name"] for o in named if o["kind"] in ("StatefulSet", "Service")}
       == {"mail-listener", "mail-listener-headless"})
expect("nameOverride renames the chart's part of names and labels",
       one(render("env.host=redis,ApiUrl=crm.example.com,nameOverride=mail")[0], "StatefulSet")
       ["metadata"]["name"] == "el-mail")
template = one(base, "StatefulSet")["spec"]["template"]
expect("the pod template carries the recommended labels",
       {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by"} <= set(template["metadata"]["labels"]))
expect("pods spread over nodes by default",
       template["spec"]["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname")
expect("a startup probe, so a slow first store answer is not a failure",
       container(base)["startupProbe"]["httpGet"]["path"] == "/healthz")
tuned = render("env.host=redis,ApiUrl=crm.example.com,livenessProbe.periodSeconds=30,"
               "service.annotations.team=crm,priorityClassName=business,"
               "hostAliases[0].ip=10.0.0.5,hostAliases[0].hostnames[0]=mail.contoso.local,"
               "extraVolumes[0].name=extra,extraVolumes[0].emptyDir.medium=Memory,"
               "extraVolumeMounts[0].name=extra,extraVolumeMounts[0].mountPath=/extra,"
               "podAnnotations.prometheus\\.io/port=9090,podAnnotations.team=crm,"
               "updateStrategy.type=OnDelete")[0]
tuned_pod = one(tuned, "StatefulSet")["spec"]["template"]
expect("probes are values", container(tuned)["livenessProbe"]["periodSeconds"] == 30)
expect("service.annotations annotate the API Service",
       one(tuned, "Service")["metadata"].get("annotations", {}).get("team") == "crm")
expect("priorityClassName and hostAliases reach the pod",
       tuned_pod["spec"].get("priorityClassName") == "business"
       and tuned_pod["spec"]["hostAliases"][0]["hostnames"] == ["mail.contoso.local"])
expect("extra volumes are mounted",
       any(v["name"] == "extra" for v in tuned_pod["spec"]["volumes"])
       and any(m["mountPath"] == "/extra" for m in container(tuned)["volumeMounts"]))
expect("podAnnotations merge with the scrape annotations, one key each",
       tuned_pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
       and tuned_pod["metadata"]["annotations"]["team"] == "crm"
       and tuned_pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true")
expect("updateStrategy is a value", one(tuned, "StatefulSet")["spec"]["updateStrategy"]["type"] == "OnDelete")

# Metrics: one scrape per pod, this release's alone.
monitored = render("env.host=redis,ApiUrl=crm.example.com,serviceMonitor.enabled=true,"
                   "serviceMonitor.labels.release=prometheus")[0]
wanted = one(monitored, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
scraped = [o["metadata"]["name"] for o in monitored if o["kind"] == "Service"
           and all(o["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
expect(f"the ServiceMonitor scrapes each pod through one Service, on the metrics port ({scraped})",
       scraped == ["el-exchangelistener-headless"]
       and one(monitored, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics")
expect("serviceMonitor.labels label the ServiceMonitor",
       one(monitored, "ServiceMonitor")["metadata"]["labels"].get("release") == "prometheus")
query = one(render(VALUE_SETS["KEDA"], name="other")[0], "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
expect(f"KEDA counts this release's pods alone ({query})",
       'pod=~"other-exchangelistener-[0-9]+"' in query and 'namespace="crm"' in query)

# Mistakes are refused, with a message that says what is wrong.
for label, expression, needle in [
    ("a misspelt value", "env.host=redis,ApiUrl=crm.example.com,replicaCont=3", "replicaCont"),
    ("a misspelt nested value", "env.host=redis,ApiUrl=crm.example.com,ingress.pth=/x", "pth"),
    ("two replicas without Redis", "replicaCount=2", "env.host"),
    ("an unknown Exchange login", "env.host=redis,ApiUrl=crm.example.com,exchange.auth=kerberos", "/exchange/auth"),
    ("service accounts without Creatio hosts", "env.host=redis,ApiUrl=crm.example.com,exchange.serviceAccountsSecret=s,"
     "creatio.hostsFromApiUrl=false", "creatio.hosts"),
    ("Graph apps without Creatio hosts", "env.host=redis,ApiUrl=crm.example.com,graph.appsSecret=s,"
     "creatio.hostsFromApiUrl=false", "creatio.hosts"),
    ("a Graph notification URL without apps", "env.host=redis,ApiUrl=crm.example.com,"
     "graph.notificationUrl=https://crm.example.com/n", "graph.appsSecret"),
    ("a Graph notification URL that is not HTTPS", "env.host=redis,ApiUrl=crm.example.com,graph.appsSecret=s,"
     "graph.notificationUrl=http://crm.example.com/n", "/graph/notificationUrl"),
    ("two hosts in one list entry", "env.host=redis,ApiUrl=crm.example.com,creatio.hosts={a.com\\,b.com}", "/creatio/hosts"),
    ("an Ingress without a host", "env.host=redis", "ApiUrl"),
    ("ApiUrl with a scheme", "env.host=redis,ApiUrl=https://crm.example.com", "/ApiUrl"),
    ("ApiUrl with a path", "env.host=redis,ApiUrl=crm.example.com/el", "/ApiUrl"),
    ("a regular expression as ingress.path", "env.host=redis,ApiUrl=crm.example.com,ingress.path=/el(/|$)(.*)",
     "/ingress/path"),
    ("a Redis database that is not a number", "env.host=redis,ApiUrl=crm.example.com,env.base=one",
     "/env/base"),
    ("autoscaling without Redis", "replicaCount=1,ApiUrl=crm.example.com,autoscaling.enabled=true",
     "env.host"),
    ("KEDA without Redis", "replicaCount=1,ApiUrl=crm.example.com,keda.enabled=true", "env.host"),
    ("a drain as long as the grace period", "env.host=redis,ApiUrl=crm.example.com,drainSeconds=30",
     "terminationGracePeriodSeconds"),
    ("HPA and KEDA together", "env.host=redis,ApiUrl=crm.example.com,autoscaling.enabled=true,keda.enabled=true",
     "choose one"),
    ("metrics on the API's port", "env.host=redis,ApiUrl=crm.example.com,metrics.port=8080", "/metrics/port"),
    ("Sentinel over TLS", "env.host=redis,ApiUrl=crm.example.com,redis.sentinelMaster=m,redis.tls=true",
     "redis.sentinelMaster with redis.tls"),
    ("a listen address that is a host name", "env.host=redis,ApiUrl=crm.example.com,listenAddress=localhost",
     "/listenAddress"),
    ("a memory limit below the mailbox cap", "env.host=redis,ApiUrl=crm.example.com,resources.limits.memory=512Mi",
     "lower maxActiveMailboxes to 8192"),
    ("a memory limit in G below the cap", "env.host=redis,ApiUrl=crm.example.com,resources.limits.memory=1G,"
     "maxActiveMailboxes=20000", "raise the limit to 1158Mi"),
]:
    try:
        render(expression)
        refused, message = False, "rendered"
    except helm.HelmError as e:
        refused, message = needle in str(e), str(e)
    expect(f"{label} is refused naming {needle!r} ({message.splitlines()[0][:100]})", refused)

lint = helm.lint(CHART, helm.parse_set_string("env.host=redis,ApiUrl=crm.example.com"), strict=True)
expect(f"helm lint --strict: no errors ({lint.get('errors')})", not lint.get("errors"))

if failures:
    print(f"\n{len(failures)} chart check(s) failed", file=sys.stderr)
    sys.exit(1)
print("\nthe chart renders valid Kubernetes and honours the original's values")
