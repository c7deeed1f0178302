// Package deploy_test checks the deployment recipe without a cluster: every
// Kubernetes manifest decodes strictly into the k8s.io/api type of its kind
// (an unknown or misspelled field fails), the pieces agree with each other
// and with the gateway, and every query of the Grafana dashboard and the
// Prometheus adapter names a metric that prommetrics exports.
package deploy_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tether-ws/tether/prommetrics"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// manifests decodes every document of the YAML files in kubernetes/ into
// the type of its kind, strictly.
type manifests struct {
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	pdbs        []*policyv1.PodDisruptionBudget
	hpas        []*autoscalingv2.HorizontalPodAutoscaler
	configMaps  []*corev1.ConfigMap
}

func load(t *testing.T) *manifests {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in kubernetes/: %v", err)
	}
	m := &manifests{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s, document %d: %v", file, i, err)
			}
			var obj any
			switch tm.APIVersion + " " + tm.Kind {
			case "apps/v1 Deployment":
				d := &appsv1.Deployment{}
				m.deployments, obj = append(m.deployments, d), d
			case "v1 Service":
				s := &corev1.Service{}
				m.services, obj = append(m.services, s), s
			case "policy/v1 PodDisruptionBudget":
				p := &policyv1.PodDisruptionBudget{}
				m.pdbs, obj = append(m.pdbs, p), p
			case "autoscaling/v2 HorizontalPodAutoscaler":
				h := &autoscalingv2.HorizontalPodAutoscaler{}
				m.hpas, obj = append(m.hpas, h), h
			case "v1 ConfigMap":
				c := &corev1.ConfigMap{}
				m.configMaps, obj = append(m.configMaps, c), c
			default:
				t.Fatalf("%s, document %d: unexpected %q %q", file, i, tm.APIVersion, tm.Kind)
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s, document %d (%s): %v", file, i, tm.Kind, err)
			}
		}
	}
	return m
}

func stripComments(doc string) string {
	var b strings.Builder
	for line := range strings.Lines(doc) {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line)
		}
	}
	return b.String()
}

func TestManifests(t *testing.T) {
	m := load(t)
	if len(m.deployments) != 1 || len(m.services) != 1 || len(m.pdbs) != 1 || len(m.hpas) != 1 || len(m.configMaps) != 1 {
		t.Fatalf("want one Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler and ConfigMap; got %d, %d, %d, %d, %d",
			len(m.deployments), len(m.services), len(m.pdbs), len(m.hpas), len(m.configMaps))
	}
	d := m.deployments[0]
	pod := d.Spec.Template
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || !sel.Matches(labels.Set(pod.Labels)) {
		t.Fatalf("the Deployment's selector %v does not select its pods %v (%v)", d.Spec.Selector, pod.Labels, err)
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want the gateway alone", len(pod.Spec.Containers))
	}
	c := pod.Spec.Containers[0]
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}

	// The probes ask the gateway's own endpoints, on a port it serves.
	rp, lp := c.ReadinessProbe, c.LivenessProbe
	if rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Path != "/ready" || ports[rp.HTTPGet.Port.String()] == 0 {
		t.Errorf("readiness probe %+v, want GET /ready on a named container port", rp)
	}
	if lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz" || ports[lp.HTTPGet.Port.String()] == 0 {
		t.Errorf("liveness probe %+v, want GET /healthz on a named container port", lp)
	}
	// Draining: the preStop sleep, then the drain the args ask for, then
	// the hub's shutdown (5 s), all within the grace period.
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
		t.Fatal("no preStop sleep: a terminating pod would be sent new conns while it drains")
	}
	preStop := time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	drain := flagDuration(t, c.Args, "-drain")
	grace := time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	if grace < preStop+drain+5*time.Second {
		t.Errorf("terminationGracePeriodSeconds %v is less than preStop %v + drain %v + 5 s of shutdown", grace, preStop, drain)
	}
	// A rolling update brings a pod up before it drains one.
	if ru := d.Spec.Strategy.RollingUpdate; ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Errorf("rolling update %+v, want maxUnavailable 0", ru)
	}

	s := m.services[0]
	if !labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(pod.Labels)) {
		t.Errorf("the Service selects %v, not the pods %v", s.Spec.Selector, pod.Labels)
	}
	for _, p := range s.Spec.Ports {
		if ports[p.TargetPort.String()] == 0 {
			t.Errorf("the Service's port %q targets %q, which the container does not name", p.Name, p.TargetPort.String())
		}
	}
	pdbSel, err := metav1.LabelSelectorAsSelector(m.pdbs[0].Spec.Selector)
	if err != nil || !pdbSel.Matches(labels.Set(pod.Labels)) {
		t.Errorf("the PodDisruptionBudget does not select the pods (%v)", err)
	}

	h := m.hpas[0]
	if ref := h.Spec.ScaleTargetRef; ref.Kind != "Deployment" || ref.Name != d.Name || ref.APIVersion != "apps/v1" {
		t.Errorf("the HPA scales %+v, not the Deployment %q", ref, d.Name)
	}
	var cpu bool
	var podMetrics []string
	for _, mt := range h.Spec.Metrics {
		switch {
		case mt.Type == autoscalingv2.ResourceMetricSourceType && mt.Resource != nil && mt.Resource.Name == corev1.ResourceCPU:
			cpu = true
			if c.Resources.Requests.Cpu().IsZero() {
				t.Error("the HPA scales on CPU utilization, which needs a CPU request")
			}
		case mt.Type == autoscalingv2.PodsMetricSourceType && mt.Pods != nil:
			podMetrics = append(podMetrics, mt.Pods.Metric.Name)
		}
	}
	exported := exportedMetrics(t)
	if !cpu || !slices.Contains(podMetrics, "tether_connections") {
		t.Errorf("the HPA scales on CPU %v and on pod metrics %q, want CPU and tether_connections", cpu, podMetrics)
	}
	for _, name := range podMetrics {
		if !exported[name] {
			t.Errorf("the HPA scales on %q, which prommetrics does not export", name)
		}
	}

	// The adapter's rules serve the metric the HPA reads, from series
	// prommetrics exports.
	var cfg struct {
		Rules []struct {
			SeriesQuery string `json:"seriesQuery"`
			Resources   struct {
				Overrides map[string]struct {
					Resource string `json:"resource"`
				} `json:"overrides"`
			} `json:"resources"`
			Name struct {
				Matches string `json:"matches"`
				As      string `json:"as"`
			} `json:"name"`
			MetricsQuery string `json:"metricsQuery"`
		} `json:"rules"`
	}
	if err := yaml.UnmarshalStrict([]byte(m.configMaps[0].Data["config.yaml"]), &cfg); err != nil {
		t.Fatalf("prometheus-adapter config.yaml: %v", err)
	}
	served := map[string]bool{}
	for _, r := range cfg.Rules {
		checkNames(t, "prometheus-adapter seriesQuery", r.SeriesQuery, exported)
		if r.Resources.Overrides["pod"].Resource != "pod" || r.MetricsQuery == "" {
			t.Errorf("prometheus-adapter rule %q: want the pod label mapped to pods, and a metricsQuery", r.SeriesQuery)
		}
		served[r.Name.As] = true
	}
	for _, name := range podMetrics {
		if !served[name] {
			t.Errorf("no prometheus-adapter rule serves %q to the HPA", name)
		}
	}
}

// flagDuration reads the value of a -name flag from args.
func flagDuration(t *testing.T, args []string, name string) time.Duration {
	t.Helper()
	for i, a := range args {
		if a == name && i+1 < len(args) {
			d, err := time.ParseDuration(args[i+1])
			if err != nil {
				t.Fatalf("%s %q: %v", name, args[i+1], err)
			}
			return d
		}
	}
	t.Fatalf("no %s in the container's args %q", name, args)
	return 0
}

func TestDashboard(t *testing.T) {
	data, err := os.ReadFile("grafana/tether-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&dash); err != nil {
		t.Fatal(err)
	}
	if dash.Title == "" || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("dashboard %q (uid %q) with %d panels", dash.Title, dash.UID, len(dash.Panels))
	}
	exported := exportedMetrics(t)
	used := map[string]bool{}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, n := range checkNames(t, "panel "+p.Title, tg.Expr, exported) {
				used[n] = true
			}
		}
	}
	// Every metric prommetrics exports has a place on the dashboard.
	for name := range exported {
		if !used[name] {
			t.Errorf("the dashboard shows nothing of %s", name)
		}
	}
}

var metricName = regexp.MustCompile(`\btether_[a-z_]+\b`)

// checkNames checks that every tether_ metric expr names is exported
// (a histogram's series by their suffixes), and returns the metrics.
func checkNames(t *testing.T, where, expr string, exported map[string]bool) []string {
	t.Helper()
	names := metricName.FindAllString(expr, -1)
	if len(names) == 0 {
		t.Errorf("%s: %q names no tether metric", where, expr)
	}
	var out []string
	for _, n := range names {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && exported[b] {
				base = b
			}
		}
		if !exported[base] {
			t.Errorf("%s: %q names %s, which prommetrics does not export", where, expr, n)
		}
		out = append(out, base)
	}
	return out
}

// exportedMetrics returns the names of every metric prommetrics
// describes, those that appear only with a broker included.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	var r describer
	if _, err := prommetrics.New(&r); err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for _, c := range r.collectors {
		ch := make(chan *prometheus.Desc, 100)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			m := fq.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read the name of %v", d)
			}
			names[m[1]] = true
		}
	}
	if !names["tether_connections"] {
		t.Fatalf("prommetrics describes %v: no tether_connections", names)
	}
	return names
}

// describer is a prometheus.Registerer that keeps what is registered, to
// describe it.
type describer struct{ collectors []prometheus.Collector }

func (r *describer) Register(c prometheus.Collector) error {
	r.collectors = append(r.collectors, c)
	return nil
}

func (r *describer) MustRegister(cs ...prometheus.Collector) {
	r.collectors = append(r.collectors, cs...)
}

func (r *describer) Unregister(prometheus.Collector) bool { return false }
