package membership

import (
	"context"
	"testing"
	"time"
)

// TestClusterLifecycle: join, meta, SetMeta, Leave, abrupt failure with
// the default timing knobs, and a restart under the same name and address.
// A fourth node is used for the leave so that "others" stay plural.
func TestClusterLifecycle(t *testing.T) {
	ctx := context.Background()
	names := []string{"n1", "n2", "n3", "n4"}
	metas := map[string]NodeMeta{}
	var agents []*Agent
	for i, name := range names {
		metas[name] = testMeta(name)
		var join []string
		if i > 0 {
			join = []string{agents[0].Addr()}
		}
		agents = append(agents, startAgent(t, testConfig(name, join...), metas[name]))
	}
	evs := collect(agents[0])

	waitFor(t, 10*time.Second, "all agents see all alive with their meta", func() bool {
		for _, a := range agents {
			for i, name := range names {
				m := metas[name]
				if !sees(a, name, StateAlive, &m) {
					return false
				}
				if got, _ := a.Member(name); got.Addr != agents[i].Addr() {
					return false
				}
			}
		}
		return true
	})
	for _, a := range agents {
		ms := a.Members()
		if len(ms) != 4 {
			t.Fatalf("%s: %d members, want 4", a.LocalName(), len(ms))
		}
		for i, m := range ms {
			if m.Name != names[i] || m.Meta.Labels["zone"] != "z-"+names[i] || m.Since.IsZero() {
				t.Fatalf("%s: member %d = %+v", a.LocalName(), i, m)
			}
		}
	}

	// SetMeta propagates.
	upd := metas["n2"].clone()
	upd.Free = 12345
	upd.Labels["disk"] = "nvme"
	if err := agents[1].SetMeta(ctx, upd); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "SetMeta seen everywhere", func() bool {
		for _, a := range agents {
			if !sees(a, "n2", StateAlive, &upd) {
				return false
			}
		}
		return true
	})
	if !evs.has("n2", EventUpdate) {
		waitFor(t, time.Second, "update event", func() bool { return evs.has("n2", EventUpdate) })
	}

	// Graceful leave: others see "left", never "dead".
	if err := agents[3].Leave(ctx); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	d := waitFor(t, 5*time.Second, "n4 seen as left", func() bool {
		for _, a := range agents[:3] {
			if !sees(a, "n4", StateLeft, nil) {
				return false
			}
		}
		return true
	})
	t.Logf("leave seen by all others after %v", d)
	waitFor(t, time.Second, "leave event", func() bool { return evs.has("n4", EventLeave) })
	if evs.has("n4", EventFail) {
		t.Fatal("n4 reported as failed")
	}

	// Abrupt failure (like kill -9), default timing knobs.
	addr3 := agents[2].Addr()
	killed := time.Now()
	if err := agents[2].Shutdown(); err != nil {
		t.Fatal(err)
	}
	seen := map[string]time.Duration{}
	waitFor(t, 20*time.Second, "n3 seen as dead by n1 and n2", func() bool {
		for _, a := range agents[:2] {
			if _, ok := seen[a.LocalName()]; !ok && sees(a, "n3", StateDead, nil) {
				seen[a.LocalName()] = time.Since(killed)
			}
		}
		return len(seen) == 2
	})
	for who, d := range seen {
		t.Logf("n3 killed: %s reports it dead after %v", who, d.Round(time.Millisecond))
		if d > 10*time.Second {
			t.Errorf("%s took %v to report n3 dead, want <= 10s", who, d)
		}
	}
	if m, _ := agents[0].Member("n3"); !metaEqual(m.Meta, metas["n3"]) {
		t.Errorf("dead n3 lost its last meta: %+v", m.Meta)
	}
	waitFor(t, time.Second, "fail event", func() bool { return evs.has("n3", EventFail) })

	// The same name at the same address comes back with new meta.
	back := testMeta("n3")
	back.Version = "v2"
	back.Free = 42
	cfg := testConfig("n3", agents[0].Addr())
	cfg.Bind = addr3
	n3 := startAgent(t, cfg, back)
	waitFor(t, 5*time.Second, "n3 back alive with new meta", func() bool {
		for _, a := range agents[:2] {
			if !sees(a, "n3", StateAlive, &back) {
				return false
			}
		}
		return sees(n3, "n1", StateAlive, nil) && sees(n3, "n2", StateAlive, nil)
	})
	if m, _ := agents[0].Member("n3"); m.Addr != addr3 {
		t.Fatalf("n3 at %s, want %s", m.Addr, addr3)
	}
	waitFor(t, time.Second, "rejoin event", func() bool { return evs.has("n3", EventJoin) })
	if !sees(agents[0], "n4", StateLeft, nil) {
		t.Fatal("n4 no longer listed as left")
	}
}

func TestNewErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := New(ctx, Config{Bind: "127.0.0.1:0"}, NodeMeta{}); err == nil {
		t.Error("empty name accepted")
	}
	if _, err := New(ctx, Config{Name: "x", Bind: "localhost:1"}, NodeMeta{}); err == nil {
		t.Error("non-IP bind accepted")
	}
	big := NodeMeta{Labels: map[string]string{"k": string(make([]byte, 600))}}
	if _, err := New(ctx, testConfig("x"), big); err == nil {
		t.Error("oversized meta accepted")
	}
	// No seed answers: the error names the seeds.
	cfg := testConfig("lonely", "127.0.0.1:1")
	_, err := New(ctx, cfg, NodeMeta{})
	var je *JoinError
	if !asJoinError(err, &je) || len(je.Seeds) != 1 {
		t.Fatalf("New with dead seed: %v", err)
	}
	t.Logf("dead seed: %v", err)

	// Rejoin keeps trying until a seed is up.
	a := startAgent(t, testConfig("r1"), testMeta("r1"))
	b := startAgent(t, testConfig("r2"), testMeta("r2"))
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := b.Rejoin(rctx, "127.0.0.1:1", a.Addr()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "r1 sees r2", func() bool { return sees(a, "r2", StateAlive, nil) })
	short, cancel2 := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel2()
	if err := b.Rejoin(short, "127.0.0.1:1"); !asJoinError(err, &je) {
		t.Fatalf("Rejoin to dead seed: %v", err)
	}
	if err := b.SetMeta(ctx, big); err == nil {
		t.Error("SetMeta accepted oversized meta")
	}
	_ = b.Shutdown()
	if err := b.SetMeta(ctx, NodeMeta{}); err != ErrClosed {
		t.Errorf("SetMeta after Shutdown: %v", err)
	}
	if err := b.Leave(ctx); err != ErrClosed {
		t.Errorf("Leave after Shutdown: %v", err)
	}
	for range b.Events() { // closed by Shutdown: this loop ends
	}
}
