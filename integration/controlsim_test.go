//go:build bench

package integration

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv"
	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/ownership"
	"github.com/ukai-storage/ukai/placement"
)

var simNodes = flag.String("sim-nodes", "10,30,100", "node counts of TestBenchControlPlaneSim (200 images per node)")

// countingKV counts what a node asks of the store: requests by kind and
// the bytes of keys and values it reads (Consul's JSON, base64 values
// included, is about 1.4× that).
type countingKV struct {
	meta.KV
	reads, watches, writes, renews, bytes atomic.Int64
}

func (c *countingKV) Get(ctx context.Context, key string) (meta.Entry, error) {
	c.reads.Add(1)
	e, err := c.KV.Get(ctx, key)
	c.bytes.Add(int64(len(e.Key) + len(e.Value)))
	return e, err
}

func (c *countingKV) List(ctx context.Context, prefix string) ([]meta.Entry, uint64, error) {
	c.reads.Add(1)
	es, idx, err := c.KV.List(ctx, prefix)
	for _, e := range es {
		c.bytes.Add(int64(len(e.Key) + len(e.Value)))
	}
	return es, idx, err
}

func (c *countingKV) Watch(ctx context.Context, prefix string, index uint64) (uint64, error) {
	c.watches.Add(1)
	return c.KV.Watch(ctx, prefix, index)
}

func (c *countingKV) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	c.writes.Add(1)
	return c.KV.CAS(ctx, key, value, index)
}

func (c *countingKV) CASTouch(ctx context.Context, key string, value []byte, index uint64, touch []string) error {
	c.writes.Add(1)
	return c.KV.CASTouch(ctx, key, value, index, touch)
}

func (c *countingKV) DeleteCAS(ctx context.Context, key string, index uint64) error {
	c.writes.Add(1)
	return c.KV.DeleteCAS(ctx, key, index)
}

func (c *countingKV) Acquire(ctx context.Context, key string, value []byte, session string) (bool, error) {
	c.writes.Add(1)
	return c.KV.Acquire(ctx, key, value, session)
}

func (c *countingKV) RenewSession(ctx context.Context, id string) error {
	c.renews.Add(1)
	return c.KV.RenewSession(ctx, id)
}

// simNode is one node's control plane, in process: its ownership
// session and the doorbell follower the node runs (meta.Follow), applying
// records to a view (image -> owner, revision) instead of volumes.
type simNode struct {
	name string
	kv   *countingKV
	cat  *meta.Catalog
	sess *ownership.Session

	mu   sync.Mutex
	view map[string]meta.Image

	stop context.CancelFunc
	wg   sync.WaitGroup
}

func (s *simNode) concerns(img meta.Image) bool {
	return img.HasLocation(s.name) || img.Owner == s.name || img.Attached == s.name
}

func (s *simNode) full(ctx context.Context) error {
	imgs, _, _, err := s.cat.ListImages(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, img := range imgs {
		if s.concerns(img) {
			s.view[img.Name] = img
		}
	}
	return nil
}

func (s *simNode) changed(ctx context.Context, name string) (bool, error) {
	img, _, err := s.cat.GetImage(ctx, name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if errors.Is(err, meta.ErrImageNotFound) {
		delete(s.view, name)
		return false, nil
	}
	if err != nil {
		return true, err
	}
	if !s.concerns(img) {
		delete(s.view, name)
		return false, nil
	}
	s.view[name] = img
	return true, nil
}

func (s *simNode) sees(name string) meta.Image {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.view[name]
}

func (s *simNode) start(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = func() { cancel(); s.wg.Wait() }
	s.wg.Go(func() { s.sess.Run(ctx) })
	s.wg.Go(func() {
		meta.Follow(ctx, meta.FollowConfig{Catalog: s.cat, Node: s.name, Resync: time.Hour, Full: s.full, Changed: s.changed, Result: func(error) {}})
	})
	t.Cleanup(s.stop)
}

type simRow struct {
	nodes, images                             int
	opsPerS, raftPerS, readBps                float64
	changeBytes, changeReaders, fullListBytes int64
	takeover, lockDelay                       time.Duration
	setup                                     time.Duration
}

// TestBenchControlPlaneSim runs the control plane of 10 to 100 nodes in
// one process against one real Consul agent (200 three-copy images per
// node, 20,000 at 100 nodes), each node with its own client, session and
// doorbell follower, and measures: the steady-state requests to Consul,
// the bytes all nodes read for one record change, and the time until
// every live node holding a copy of a dead node's images sees their new
// owner. (One agent serves every simulated node from one address, so its
// per-client connection limit is raised; real nodes each have their own.)
func TestBenchControlPlaneSim(t *testing.T) {
	var sizes []int
	for _, f := range strings.Split(*simNodes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 3 {
			t.Fatalf("-sim-nodes %q", *simNodes)
		}
		sizes = append(sizes, n)
	}
	var rows []simRow
	for _, n := range sizes {
		rows = append(rows, simRun(t, n))
	}
	var b strings.Builder
	b.WriteString("\n### Control plane simulation (TestBenchControlPlaneSim: in-process nodes, one real Consul, 200 three-copy images per node)\n\n")
	b.WriteString("| nodes | images | requests/s to Consul (idle) | Raft writes/s (idle) | bytes read/s (idle) | bytes read by all nodes for one change (nodes reading) | a full listing (what every node read per change before) | dead owner's images seen moved by every copy holder | of which lock delay |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %d | %d | %.1f | %.2f | %.0f | %d (%d) | %d × %d nodes | %v | %v |\n", r.nodes, r.images, r.opsPerS, r.raftPerS, r.readBps,
			r.changeBytes, r.changeReaders, r.fullListBytes, r.nodes, r.takeover.Round(100*time.Millisecond), r.lockDelay)
	}
	appendReport(t, b.String())
}

func simRun(t *testing.T, nodes int) simRow {
	const perNode = 200
	const ttl = 10 * time.Second
	agent := consultest.Start(t, consultest.WithHCL(`limits { http_max_conns_per_client = 8192 }`))
	defer agent.Stop()
	sim := make([]*simNode, nodes)
	for i := range sim {
		ckv, err := consulkv.New(consulkv.Config{Address: agent.Addr})
		if err != nil {
			t.Fatal(err)
		}
		kv := &countingKV{KV: ckv}
		name := fmt.Sprintf("s%03d", i)
		sim[i] = &simNode{name: name, kv: kv, cat: meta.NewCatalog(kv, "ukai/"), view: map[string]meta.Image{},
			sess: ownership.NewSession(ownership.SessionConfig{Store: kv, Name: "ukai:" + name, TTL: ttl, LockDelay: ownership.LockDelayFor(ttl)})}
		sim[i].start(t)
	}
	waitFor(t, 60*time.Second, "every session", func() bool {
		for _, s := range sim {
			if s.sess.Current() == "" {
				return false
			}
		}
		return true
	})
	start := time.Now()
	images := nodes * perNode
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	for range 16 {
		wg.Go(func() {
			ctx := context.Background()
			for {
				i := int(next.Add(1) - 1)
				if i >= images || failed.Load() != nil {
					return
				}
				k := i % nodes
				o := sim[k]
				img, err := o.cat.CreateImage(ctx, meta.Image{Name: fmt.Sprintf("vm%05d", i), Size: 1 << 20, BlockSize: 64 << 10, Generation: 1, Owner: o.name,
					Locations: []string{o.name, sim[(k+1)%nodes].name, sim[(k+2)%nodes].name}}, placement.InSync)
				if err == nil {
					var ok bool
					ok, err = o.cat.AcquireOwnership(ctx, img.ID, o.name, o.sess.Current())
					if err == nil && !ok {
						err = fmt.Errorf("lock of %s refused", img.Name)
					}
				}
				if err != nil {
					failed.Store(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		t.Fatalf("%d nodes: setup: %v", nodes, err)
	}
	waitFor(t, 5*time.Minute, "every node to follow its images", func() bool {
		for _, s := range sim {
			s.mu.Lock()
			l := len(s.view)
			s.mu.Unlock()
			if l != 3*perNode {
				return false
			}
		}
		return true
	})
	row := simRow{nodes: nodes, images: images, setup: time.Since(start), lockDelay: ownership.LockDelayFor(ttl)}

	// Idle: nothing changes for 20 s.
	sum := func(f func(*countingKV) int64) int64 {
		var v int64
		for _, s := range sim {
			v += f(s.kv)
		}
		return v
	}
	ops := func(c *countingKV) int64 {
		return c.reads.Load() + c.watches.Load() + c.writes.Load() + c.renews.Load()
	}
	rd := func(c *countingKV) int64 { return c.bytes.Load() }
	o0, b0, r0 := sum(ops), sum(rd), consulCommitIndex(t, agent.Addr)
	const window = 20 * time.Second
	time.Sleep(window)
	o1, b1, r1 := sum(ops), sum(rd), consulCommitIndex(t, agent.Addr)
	row.opsPerS, row.readBps, row.raftPerS = float64(o1-o0)/window.Seconds(), float64(b1-b0)/window.Seconds(), float64(r1-r0)/window.Seconds()

	// One change: the operator pauses sync of one image.
	before := make([]int64, nodes)
	for i, s := range sim {
		before[i] = s.kv.bytes.Load()
	}
	img, err := sim[0].cat.UpdateImage(context.Background(), "vm00000", func(i *meta.Image) error { i.SyncPaused = true; return nil })
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the change to reach the nodes holding a copy", func() bool {
		for _, s := range sim[:3] {
			if !s.sees("vm00000").SyncPaused {
				return false
			}
		}
		return true
	})
	for i, s := range sim {
		if d := s.kv.bytes.Load() - before[i]; d > 0 {
			row.changeBytes += d
			row.changeReaders++
		}
	}
	_ = img
	full, _, _ := sim[0].kv.KV.List(context.Background(), "ukai/images/")
	for _, e := range full {
		row.fullListBytes += int64(len(e.Key) + len(e.Value))
	}

	// A dead owner: s000 stops (no renewal, no follower: a kill -9). s001,
	// told by the membership, destroys its session and takes its images
	// as the lock delay allows; every live copy holder must see them move.
	dead, taker := sim[0], sim[1]
	deadSession := dead.sess.Current()
	dead.stop()
	t0 := time.Now()
	ctx := context.Background()
	if err := taker.kv.DestroySession(ctx, deadSession); err != nil {
		t.Fatal(err)
	}
	var victims []meta.Image
	taker.mu.Lock()
	for _, im := range taker.view {
		if im.Owner == dead.name {
			victims = append(victims, im)
		}
	}
	taker.mu.Unlock()
	if len(victims) != perNode {
		t.Fatalf("the taker sees %d images of the dead node, want %d", len(victims), perNode)
	}
	for _, v := range victims {
		for {
			ok, err := taker.cat.AcquireOwnership(ctx, v.ID, taker.name, taker.sess.Current())
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if _, err := taker.cat.UpdateImage(ctx, v.Name, func(i *meta.Image) error { i.Owner = taker.name; i.Generation++; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 2*time.Minute, "every live copy holder to see the new owner", func() bool {
		for _, v := range victims {
			for _, s := range sim[1:] {
				if v.HasLocation(s.name) && s.sees(v.Name).Owner != taker.name {
					return false
				}
			}
		}
		return true
	})
	row.takeover = time.Since(t0)
	if el := time.Since(t0); el < row.lockDelay {
		t.Errorf("%d nodes: a dead node's lock was taken %v after its session was destroyed, within the lock delay %v", nodes, el, row.lockDelay)
	}
	t.Logf("%d nodes, %d images (set up in %v): idle %.1f req/s, %.2f raft writes/s, %.0f B/s read; one change: %d B read by %d nodes (a full listing is %d B); dead owner's images seen moved after %v",
		nodes, images, row.setup.Round(time.Second), row.opsPerS, row.raftPerS, row.readBps, row.changeBytes, row.changeReaders, row.fullListBytes, row.takeover.Round(100*time.Millisecond))
	for _, s := range sim[1:] {
		s.stop()
	}
	return row
}
