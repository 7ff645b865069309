package metrics

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ukai-storage/ukai/target/scsi"
)

type nullBackend struct{ err error }

func (b nullBackend) ReadAt(context.Context, []byte, int64) error        { return b.err }
func (b nullBackend) WriteAt(context.Context, []byte, int64, bool) error { return b.err }
func (b nullBackend) Flush(context.Context) error                        { return b.err }
func (b nullBackend) Unmap(context.Context, int64, int64) error          { return b.err }

type source struct{}

func (source) Images() []ImageState {
	return []ImageState{{Name: "vm1", Owner: "n1", Size: 8 << 20, BlockSize: 4 << 20, Wanted: 2, Known: true,
		Locations: []LocationState{{Node: "n1", Alive: true}, {Node: "n2", Alive: false, OutOfSync: 1}}},
		// Not planned here yet: no counts, so no guess of "all in sync".
		{Name: "vm9", Size: 4 << 20, BlockSize: 4 << 20, Wanted: 1, Locations: []LocationState{{Node: "n1", Alive: true}}}}
}
func (source) Peers() []PeerStats {
	return []PeerStats{{Peer: "n2", RTT: 2 * time.Millisecond, Requests: 10, Errors: 1, SentBytes: 4096}}
}
func (source) Node() NodeStats {
	return NodeStats{Sessions: 1, Served: 1, Owned: 1, Members: map[string]int{"alive": 1, "dead": 1}, PlannerActions: map[string]int64{"sync": 2}, StoreOK: true}
}

func TestIOCountedAndLinted(t *testing.T) {
	m := New(Config{Node: "n1", Version: "test", Source: source{}, IO: true})
	ctx := context.Background()
	b := m.Backend("vm1", nullBackend{})
	for range 3 {
		b.WriteAt(ctx, make([]byte, 4096), 0, false)
	}
	b.ReadAt(ctx, make([]byte, 512), 0)
	b.Flush(ctx)
	bad := m.Backend("vm1", nullBackend{err: &scsi.SenseError{Key: scsi.SenseNotReady, Err: errors.New("no owner")}})
	bad.WriteAt(ctx, make([]byte, 4096), 0, false)
	m.Backend("vm1", nullBackend{err: errors.New("disk")}).ReadAt(ctx, make([]byte, 512), 0)
	m.Backend("vm1", nullBackend{err: context.Canceled}).ReadAt(ctx, make([]byte, 512), 0) // abandoned: no error counted

	io := m.IOStat()
	if len(io) != 1 || io[0].WriteOps != 4 || io[0].WriteBytes != 4*4096 || io[0].ReadOps != 3 || io[0].FlushOps != 1 || io[0].Errors != 2 {
		t.Fatalf("counters %+v", io)
	}
	problems, err := testutil.GatherAndLint(m.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	for name, want := range map[string]string{
		"ukai_image_write_ops_total":     `ukai_image_write_ops_total{image="vm1"} 4`,
		"ukai_image_io_errors_total":     `ukai_image_io_errors_total{image="vm1",op="write",sense_key="not_ready"} 1`,
		"ukai_image_info":                `ukai_image_info{attached="",image="vm1",owner="n1"} 1`,
		"ukai_image_in_sync_copies":      `ukai_image_in_sync_copies{image="vm1"} 1`,
		"ukai_image_out_of_sync_bytes":   `ukai_image_out_of_sync_bytes{image="vm1",location="n2"} 4.194304e+06`,
		"ukai_peer_request_errors_total": `ukai_peer_request_errors_total{peer="n2"} 1`,
		"ukai_membership_nodes":          `ukai_membership_nodes{state="dead"} 1`,
		"ukai_planner_actions_total":     `ukai_planner_actions_total{action="sync"} 2`,
	} {
		if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(""), name); err == nil {
			t.Errorf("%s: no series", name)
		} else if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: want %s in\n%v", name, want, err)
		}
	}
	if n := count(t, m, "ukai_image_in_sync_copies"); n != 1 {
		t.Errorf("in-sync copies reported for %d images, want 1 (vm9's counts are unknown)", n)
	}
	if n := count(t, m, "ukai_image_location_up"); n != 3 {
		t.Errorf("location_up: %d series, want 3", n)
	}
	if n := count(t, m, "ukai_image_write_latency_seconds"); n != 1 {
		t.Errorf("write latency histograms: %d", n)
	}
	m.Forget("vm1")
	if n := count(t, m, "ukai_image_write_ops_total"); n != 0 {
		t.Errorf("a forgotten image keeps %d series", n)
	}
}

func TestIOSwitchedLive(t *testing.T) {
	m := New(Config{Node: "n1", IO: false})
	b := m.Backend("vm1", nullBackend{})
	ctx := context.Background()
	b.WriteAt(ctx, make([]byte, 512), 0, false)
	if len(m.IOStat()) != 0 || count(t, m, "ukai_image_write_ops_total") != 0 {
		t.Fatal("I/O counted while off")
	}
	m.SetIO(true)
	b.WriteAt(ctx, make([]byte, 512), 0, false)
	m.SetIO(false)
	b.WriteAt(ctx, make([]byte, 512), 0, false)
	if io := m.IOStat(); len(io) != 1 || io[0].WriteOps != 1 {
		t.Fatalf("one write counted while on: %+v", io)
	}
}

func TestConsulEndpoints(t *testing.T) {
	for path, want := range map[string]string{
		"/v1/kv/ukai/images/vm1":              "kv",
		"/v1/kv/ukai/images/?recurse&index=7": "kv/watch",
		"/v1/txn":                             "txn",
		"/v1/session/renew/abc":               "session/renew",
		"/v1/session/create":                  "session/create",
		"/v1/agent/self":                      "other",
	} {
		u, _ := url.Parse("http://127.0.0.1:8500" + path)
		if got := consulEndpoint(&http.Request{URL: u}); got != want {
			t.Errorf("%s: %s, want %s", path, got, want)
		}
	}
}

// BenchmarkCountedWrite is the cost metrics add to each command.
func BenchmarkCountedWrite(b *testing.B) {
	m := New(Config{Node: "n1", IO: true})
	be := m.Backend("vm1", nullBackend{})
	p := make([]byte, 4096)
	ctx := context.Background()
	for b.Loop() {
		be.WriteAt(ctx, p, 0, false)
	}
}

// count is the number of series of metric name the registry gathers.
func count(t *testing.T, m *Metrics, name string) int {
	t.Helper()
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}
