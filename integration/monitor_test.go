package integration

// Seeing the cluster: a real Prometheus scraping real nodes, `ukai status`,
// `ukai image iostat`, and the web view in a real (headless) Chromium.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// prometheus is a Prometheus server the test started on loopback.
type prometheus struct {
	t   *testing.T
	url string
}

// startPrometheus runs Debian's prometheus scraping targets (API
// addresses) every second; extra is YAML added to the scrape job.
func startPrometheus(t *testing.T, targets []string, extra string) *prometheus {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus not found: run `make deps` (Debian package prometheus)")
	}
	dir := t.TempDir()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ukai\n    static_configs:\n      - targets: [%s]\n%s",
		strings.Join(targets, ", "), extra)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	logs := &logBuffer{}
	cmd := exec.Command(bin, "--config.file="+cfgPath, "--web.listen-address="+addr, "--storage.tsdb.path="+filepath.Join(dir, "data"))
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", logs)
		}
	})
	p := &prometheus{t: t, url: "http://" + addr}
	waitFor(t, 30*time.Second, "prometheus to be ready", func() bool {
		resp, err := http.Get(p.url + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return p
}

// query runs an instant PromQL query and returns the value of its first
// sample (ok false when the result is empty).
func (p *prometheus) query(q string) (float64, bool) {
	p.t.Helper()
	resp, err := http.Get(p.url + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		p.t.Fatal(err)
	}
	if out.Status != "success" {
		p.t.Fatalf("query %s: %s", q, out.Error)
	}
	if len(out.Data.Result) == 0 {
		return 0, false
	}
	s, _ := out.Data.Result[0].Value[1].(string)
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		p.t.Fatalf("query %s: value %q", q, s)
	}
	return v, true
}

// waitQuery waits until q has a sample satisfying cond and returns it.
func (p *prometheus) waitQuery(timeout time.Duration, q, what string, cond func(float64) bool) float64 {
	p.t.Helper()
	var v float64
	waitFor(p.t, timeout, what+" ("+q+")", func() bool {
		var ok bool
		v, ok = p.query(q)
		return ok && cond(v)
	})
	return v
}

// writeLoad runs qemu-io writes over the first 32 MiB of url until stop is
// closed; it returns how many commands failed.
func writeLoad(t *testing.T, iscsiURL string, stop chan struct{}) (wait func() int) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			args := []string{"-f", "raw"}
			for j := range 16 {
				args = append(args, "-c", fmt.Sprintf("write -P %d %dM 1M", (i+j)%250+1, (i*16+j)%32))
			}
			args = append(args, iscsiURL)
			out, err := exec.Command("qemu-io", args...).CombinedOutput()
			if err != nil || strings.Contains(string(out), "failed") {
				mu.Lock()
				failed++
				mu.Unlock()
				t.Logf("qemu-io: %v %s", err, out)
			}
		}
	})
	return func() int { wg.Wait(); mu.Lock(); defer mu.Unlock(); return failed }
}

// TestMetricsWithPrometheus: Prometheus scrapes three nodes under a
// qemu-io write load; the image's write rate shows, its copy on a killed
// node goes out of sync in the metrics, and back to zero once the node is
// back and the copy synced. Along the way: `promtool check metrics`, `ukai
// image iostat` and `ukai status` (non-zero with a dead node holding a
// copy, zero once healthy).
func TestMetricsWithPrometheus(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2 := c.nodes[0], c.nodes[1]
	c.waitState(c.nodes, "n3", "alive", 30*time.Second)
	n1.mustCLI("image", "create", "m1", "--size", "64M", "--locations", "n1,n2")
	n1.mustCLI("image", "create", "idle", "--size", "16M", "--locations", "n2,n3")

	// The exposition passes promtool's lint, with the image's series.
	qemuIO(t, n1.url("m1"), "write -P 7 0 1M", "read -P 7 0 1M")
	metrics := httpGet(t, "http://"+n1.api+"/metrics")
	for _, want := range []string{`ukai_image_write_bytes_total{image="m1"}`, `ukai_image_info{attached="",image="m1",owner="n1"} 1`, `ukai_image_write_latency_seconds_bucket{image="m1",le="0.005"}`, `ukai_node_info{node="n1"`, `ukai_membership_nodes{state="alive"} 3`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("n1 /metrics lacks %s", want)
		}
	}
	lint := exec.Command("promtool", "check", "metrics")
	lint.Stdin = strings.NewReader(metrics)
	if out, err := lint.CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
	// Image series come from the node that plans the image only: "idle"
	// (no owner, first live location n2) is n2's to report, not n3's,
	// which holds its other copy.
	if strings.Contains(httpGet(t, "http://"+c.nodes[2].api+"/metrics"), `image="idle"`) {
		t.Errorf("n3 reports image idle, which n2 plans")
	}
	if !strings.Contains(httpGet(t, "http://"+n2.api+"/metrics"), `ukai_image_info{attached="",image="idle",owner=""} 1`) {
		t.Errorf("n2 does not report image idle")
	}

	var targets []string
	for _, n := range c.nodes {
		targets = append(targets, n.api)
	}
	prom := startPrometheus(t, targets, "")
	prom.waitQuery(30*time.Second, `count(up{job="ukai"} == 1)`, "every node scraped", func(v float64) bool { return v == 3 })

	stop := make(chan struct{})
	wait := writeLoad(t, n1.url("m1"), stop)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wait()
	}()
	rate := prom.waitQuery(60*time.Second, `sum(rate(ukai_image_write_bytes_total{image="m1"}[5s]))`, "m1's write rate", func(v float64) bool { return v > 0 })
	t.Logf("m1 write rate in Prometheus: %.1f MiB/s", rate/(1<<20))

	// iostat sees the same load, summed over the nodes.
	out := n1.mustCLI("image", "iostat", "-o", "json", "--interval", "2s")
	var rows []struct {
		Image     string  `json:"image"`
		Owner     string  `json:"owner"`
		WriteIOPS float64 `json:"write_iops"`
		WriteBps  float64 `json:"write_bytes_per_sec"`
		WriteLat  float64 `json:"write_latency_ms"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("iostat -o json: %v\n%s", err, out)
	}
	if len(rows) == 0 || rows[0].Image != "m1" || rows[0].WriteIOPS <= 0 || rows[0].WriteBps <= 0 || rows[0].WriteLat <= 0 || rows[0].Owner != "n1" {
		t.Fatalf("iostat: want m1 first, writing, owned by n1: %s", out)
	}
	t.Logf("ukai image iostat:\n%s", n1.mustCLI("image", "iostat", "--count", "1"))
	if st, _, err := n1.cli("status"); err != nil {
		t.Fatalf("status of a healthy cluster: %v\n%s", err, st)
	}
	if h := httpGet(t, "http://"+n1.api+"/v1/health"); !strings.Contains(h, `"status": "ok"`) || !strings.Contains(h, `"name": "metadata"`) {
		t.Fatalf("/v1/health: %s", h)
	}

	// Kill m1's second copy: its out-of-sync bytes rise in Prometheus.
	n2.kill9()
	oos := prom.waitQuery(60*time.Second, `max(ukai_image_out_of_sync_bytes{image="m1",location="n2"})`, "n2's copy of m1 out of sync", func(v float64) bool { return v > 0 })
	t.Logf("out of sync on n2 while it is dead: %.0f MiB", oos/(1<<20))
	prom.waitQuery(30*time.Second, `max(ukai_image_location_up{image="m1",location="n2"})`, "n2's copy of m1 down", func(v float64) bool { return v == 0 })
	// `ukai status` names the problem and exits non-zero once n2 is dead.
	var st string
	waitFor(t, 60*time.Second, "ukai status to report dead n2 and degraded m1", func() bool {
		var err error
		st, _, err = n1.cli("status")
		return err != nil && strings.Contains(st, "node_dead") && strings.Contains(st, "n2") && strings.Contains(st, "degraded") && strings.Contains(st, "m1:")
	})
	t.Logf("ukai status with n2 dead:\n%s", st)
	var js struct {
		Healthy bool `json:"healthy"`
		Images  struct {
			Degraded int `json:"degraded"`
		} `json:"images"`
	}
	jout, _, _ := n1.cli("status", "-o", "json")
	if err := json.Unmarshal([]byte(jout), &js); err != nil || js.Healthy || js.Images.Degraded != 2 {
		t.Fatalf("status -o json with n2 dead: want unhealthy, 2 degraded (m1, idle): %v %s", err, jout)
	}

	// n2 back, the load stopped: the copy syncs and the metric reaches 0.
	close(stop)
	if f := wait(); f > 0 {
		t.Errorf("%d qemu-io runs failed (min copies 1: losing a copy must not fail writes)", f)
	}
	n2.start()
	prom.waitQuery(90*time.Second, `max(ukai_image_out_of_sync_bytes{image="m1",location="n2"})`, "n2's copy of m1 back in sync", func(v float64) bool { return v == 0 })
	if v, ok := prom.query(`max_over_time(ukai_image_out_of_sync_bytes{image="m1",location="n2"}[10m])`); !ok || v <= 0 {
		t.Errorf("Prometheus lost the out-of-sync history: %v %v", v, ok)
	}
	// The sync's bytes: counted by the node that ran it (the scrape after
	// the last copied block may come a second after the copy is in sync).
	deadline := time.Now().Add(30 * time.Second)
	v, ok := prom.query(`sum(max_over_time(ukai_image_sync_bytes_total{image="m1"}[10m]))`)
	for (!ok || v <= 0) && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		v, ok = prom.query(`sum(max_over_time(ukai_image_sync_bytes_total{image="m1"}[10m]))`)
	}
	if !ok || v <= 0 {
		for _, n := range c.nodes {
			for _, l := range strings.Split(httpGet(t, "http://"+n.api+"/metrics"), "\n") {
				if strings.Contains(l, "sync_bytes_total") {
					t.Logf("%s: %s", n.name, l)
				}
			}
		}
		t.Errorf("no sync bytes for m1 in Prometheus: %v %v", v, ok)
	}
	waitFor(t, 60*time.Second, "ukai status healthy again", func() bool {
		var err error
		st, _, err = n1.cli("status")
		return err == nil && strings.Contains(st, "HEALTHY")
	})
}

func httpGet(t *testing.T, u string) string {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", u, resp.StatusCode, b)
	}
	return string(b)
}

// withToken makes n's API require the token in file tok (before start).
func withToken(t *testing.T, n *node, tok string) {
	t.Helper()
	cfg, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(cfg), "api:\n  listen: "+n.api+"\n", "api:\n  listen: "+n.api+"\n  token_file: "+tok+"\n", 1)
	if err := os.WriteFile(n.cfgPath, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	n.cliArgs = append(n.cliArgs, "--token-file", tok)
}

// domCounts is what the page shows: per location row, its cells by state.
type domCounts struct {
	Rows    map[string][3]int `json:"rows"`
	Owner   string            `json:"owner"`
	Updates int               `json:"updates"`
	Rate    string            `json:"rate"`
	ETA     string            `json:"eta"`
}

const countCells = `(() => {
  const rows = {};
  let owner = "";
  for (const row of document.querySelectorAll("#blockmap .row")) {
    const c = [0, 0, 0];
    for (const cell of row.querySelectorAll(".cell")) {
      for (let s = 0; s < 3; s++) if (cell.classList.contains("s" + s)) c[s]++;
    }
    rows[row.dataset.node] = c;
    if (row.dataset.owner === "true") owner = row.dataset.node;
  }
  return {rows, owner, updates: Number(document.body.dataset.updates || 0),
          rate: document.getElementById("rate").textContent, eta: document.getElementById("eta").textContent};
})()`

// TestWebViewInChromium: the block map page in headless Chromium, behind
// the API token, during a sync: with the sync paused its cells match
// `image info -o json --blocks` state for state; resumed under a cap, the
// page changes while the copy fills, and ends all in sync.
func TestWebViewInChromium(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium not found: run `make deps` (Debian package chromium)")
	}
	c := &cluster{t: t}
	tok := filepath.Join(t.TempDir(), "token")
	const secret = "ui-test-token-7f3a9c"
	os.WriteFile(tok, []byte(secret+"\n"), 0o600)
	c.consul = consultest.Start(t, consultest.Persistent(t.TempDir()))
	for i, name := range []string{"n1", "n2"} {
		var join []string
		if i > 0 {
			join = []string{c.nodes[0].gossip}
		}
		n := newClusterNode(t, name, clusterOpts{consul: c.consul.Addr, join: join})
		withToken(t, n, tok)
		n.start()
		c.nodes = append(c.nodes, n)
	}
	n1 := c.nodes[0]
	c.waitState(c.nodes, "n2", "alive", 30*time.Second)

	// Without the token: the page is a login form (401), the API refuses.
	for _, p := range []string{"/ui/", "/v1/images", "/metrics"} {
		resp, err := http.Get("http://" + n1.api + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(string(b), "blockmap") {
			t.Fatalf("GET %s without the token: %d %s", p, resp.StatusCode, b)
		}
	}

	// 64 blocks of 256 KiB: one cell per block. Data on n1; a copy added
	// on n2 starts all out of sync, its sync paused.
	const blocks = 64
	n1.mustCLI("image", "create", "u1", "--size", "16M", "--block-size", "256K", "--locations", "n1")
	data := filepath.Join(t.TempDir(), "data")
	buf := make([]byte, 16<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	os.WriteFile(data, buf, 0o600)
	n1.mustCLI("image", "import", "u1", data)
	n1.mustCLI("image", "sync", "u1", "--pause")
	n1.mustCLI("policy", "set", "--node", "n2", "--max-rate", "1M")
	n1.mustCLI("location", "add", "u1", "n2")

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox,
		chromedp.Flag("disable-gpu", true), chromedp.WindowSize(1280, 800))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()

	// Log in through the form, then open the image's page.
	base := "http://" + n1.api
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/ui/"),
		chromedp.WaitVisible(`input[name=token]`),
		chromedp.SendKeys(`input[name=token]`, secret),
		chromedp.Submit(`input[name=token]`),
		chromedp.WaitVisible(`#images`),
		chromedp.Navigate(base+"/ui/#image=u1"),
		chromedp.WaitVisible(`#blockmap .cell`),
	); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	sample := func() domCounts {
		d, err := chromedp.Run(ctx, chromedp.Evaluate[domCounts](countCells))
		if err != nil {
			t.Fatalf("chromium: %v", err)
		}
		return d
	}
	// fresh waits until the page has polled twice more (a poll that
	// started after now).
	fresh := func() domCounts {
		start := sample().Updates
		var d domCounts
		waitFor(t, 30*time.Second, "the page to poll", func() bool { d = sample(); return d.Updates >= start+2 })
		return d
	}
	// want counts `image info -o json --blocks` the same way.
	want := func() (map[string][3]int, string) {
		img := n1.imageJSON("u1", true)
		out := map[string][3]int{}
		for _, b := range img["blocks"].([]any) {
			for node, st := range b.(map[string]any) {
				c := out[node]
				c[int(st.(map[string]any)["sync_status"].(float64))]++
				out[node] = c
			}
		}
		owner, _ := img["owner"].(string)
		return out, owner
	}
	shot := func(name string) {
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot: %v", err)
		}
		dir := os.Getenv("UKAI_TEST_OUT")
		if dir == "" {
			dir = t.TempDir()
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot %s (%d bytes)", p, len(png))
	}

	check := func(when string) domCounts {
		d := fresh()
		w, owner := want()
		if fmt.Sprint(d.Rows) != fmt.Sprint(w) {
			t.Fatalf("%s: the page shows %v, image info --blocks says %v", when, d.Rows, w)
		}
		if d.Owner != owner {
			t.Fatalf("%s: the page marks owner %q, image info says %q", when, d.Owner, owner)
		}
		return d
	}
	d := check("sync paused")
	if d.Rows["n2"] != [3]int{0, 0, blocks} || d.Rows["n1"] != [3]int{blocks, 0, 0} {
		t.Fatalf("paused: want n1 all in sync and n2 all out of sync: %v", d.Rows)
	}
	shot("webui-paused.png")

	// Resumed under a 1 MiB/s cap (16 MiB: about 16 s), the page follows.
	n1.mustCLI("image", "sync", "u1", "--resume")
	var mid domCounts
	waitFor(t, 60*time.Second, "the page to show a partly synced copy with its rate", func() bool {
		mid = sample()
		c := mid.Rows["n2"]
		return c[0] > 0 && c[0] < blocks && strings.Contains(mid.Rate, "/s") && strings.Contains(mid.ETA, "ETA")
	})
	t.Logf("mid-sync: n2 cells %v, %s, %s", mid.Rows["n2"], mid.Rate, mid.ETA)
	shot("webui-syncing.png")
	waitFor(t, 90*time.Second, "the page to show n2 in sync", func() bool {
		return sample().Rows["n2"] == [3]int{blocks, 0, 0}
	})
	check("synced")
}

// TestAlertRulesInDocs: the example alert rules of docs/monitoring.md are
// valid Prometheus rules.
func TestAlertRulesInDocs(t *testing.T) {
	doc, err := os.ReadFile("../docs/monitoring.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "### Example alert rules\n\n```yaml\n")
	rules, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("docs/monitoring.md has no yaml block under \"Example alert rules\"")
	}
	p := filepath.Join(t.TempDir(), "rules.yml")
	os.WriteFile(p, []byte(rules), 0o600)
	out, err := exec.Command("promtool", "check", "rules", p).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "SUCCESS") {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
}
