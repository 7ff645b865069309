package membership

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

func asJoinError(err error, je **JoinError) bool { return errors.As(err, je) }

func TestNameConflict(t *testing.T) {
	ctx := context.Background()
	n1 := startAgent(t, testConfig("n1"), testMeta("n1"))
	n2 := startAgent(t, testConfig("n2", n1.Addr()), testMeta("n2"))
	n3 := startAgent(t, testConfig("n3", n1.Addr()), testMeta("n3"))
	all := []*Agent{n1, n2, n3}
	waitFor(t, 5*time.Second, "cluster formed", func() bool {
		for _, a := range all {
			for _, n := range []string{"n1", "n2", "n3"} {
				if !sees(a, n, StateAlive, nil) {
					return false
				}
			}
		}
		return true
	})
	orig, _ := n2.Member("n1")

	want := fmt.Sprintf("node name %q is already used by the live node at %s", "n1", n1.Addr())
	// Through another node, and through the live n1 itself.
	for _, seed := range []string{n2.Addr(), n1.Addr()} {
		imp := testMeta("n9")
		_, err := New(ctx, testConfig("n1", seed), imp)
		var nc *NameConflictError
		if !errors.As(err, &nc) || err.Error() != want {
			t.Fatalf("impostor via %s: got %v, want %q", seed, err, want)
		}
		t.Logf("impostor via %s refused: %v", seed, err)
	}
	// The cluster's view of n1 does not change (observe a few gossip rounds).
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		for _, a := range all {
			m, _ := a.Member("n1")
			if m.Addr != orig.Addr || m.State != StateAlive || !metaEqual(m.Meta, orig.Meta) || !m.Since.Equal(mustMember(t, a, "n1").Since) {
				t.Fatalf("%s now sees n1 as %+v", a.LocalName(), m)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A name freed by a graceful leave may be reused at a new address...
	old3 := n3.Addr()
	if err := n3.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "n3 left", func() bool { return sees(n1, "n3", StateLeft, nil) })
	n3b := startAgent(t, testConfig("n3", n2.Addr()), testMeta("n3"))
	waitFor(t, 5*time.Second, "n3 back at a new address", func() bool {
		m, _ := n1.Member("n3")
		return m.State == StateAlive && m.Addr == n3b.Addr() && m.Addr != old3
	})
	// ...and so may a name whose node died.
	old2 := n2.Addr()
	_ = n2.Shutdown()
	waitFor(t, 15*time.Second, "n2 dead", func() bool { return sees(n1, "n2", StateDead, nil) && sees(n3b, "n2", StateDead, nil) })
	n2b := startAgent(t, testConfig("n2", n1.Addr()), testMeta("n2"))
	waitFor(t, 5*time.Second, "n2 back at a new address", func() bool {
		m1, _ := n1.Member("n2")
		m3, _ := n3b.Member("n2")
		return m1.State == StateAlive && m1.Addr == n2b.Addr() && m1.Addr != old2 && m3.State == StateAlive && m3.Addr == n2b.Addr()
	})
}

func mustMember(t *testing.T, a *Agent, name string) Member {
	t.Helper()
	m, ok := a.Member(name)
	if !ok {
		t.Fatalf("%s does not know %s", a.LocalName(), name)
	}
	return m
}
