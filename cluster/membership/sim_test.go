package membership

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestSimulation64 runs 64 agents in this process on loopback with the
// default timing knobs: they converge, and one abrupt failure is reported
// dead by all 63 others within 10 s.
func TestSimulation64(t *testing.T) {
	if testing.Short() {
		t.Skip("64-agent simulation skipped in -short mode")
	}
	const n = 64
	const bound = 10 * time.Second
	agents := make([]*Agent, 0, n)
	start := time.Now()
	for i := range n {
		name := fmt.Sprintf("sim%02d", i)
		var seeds []string
		for j := 0; j < min(3, i); j++ { // up to 3 random earlier agents
			seeds = append(seeds, agents[rand.IntN(i)].Addr())
		}
		agents = append(agents, startAgent(t, testConfig(name, seeds...), testMeta(name)))
	}
	started := time.Since(start)
	alive := func(a *Agent) int {
		c := 0
		for _, m := range a.Members() {
			if m.State == StateAlive {
				c++
			}
		}
		return c
	}
	conv := waitFor(t, 90*time.Second, "64 agents see 64 alive", func() bool {
		for _, a := range agents {
			if alive(a) != n {
				return false
			}
		}
		return true
	})
	t.Logf("started %d agents in %v; converged %v after the last start (%v total)",
		n, started.Round(time.Millisecond), conv.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))

	victim := agents[37]
	killed := time.Now()
	if err := victim.Shutdown(); err != nil {
		t.Fatal(err)
	}
	others := slices.Delete(slices.Clone(agents), 37, 38)
	seen := make([]time.Duration, len(others))
	waitFor(t, 30*time.Second, "all 63 report the victim dead", func() bool {
		done := true
		for i, a := range others {
			if seen[i] == 0 {
				if sees(a, victim.LocalName(), StateDead, nil) {
					seen[i] = time.Since(killed)
				} else {
					done = false
				}
			}
		}
		return done
	})
	slices.Sort(seen)
	t.Logf("%s killed: reported dead by the first agent after %v, median %v, last %v",
		victim.LocalName(), seen[0].Round(time.Millisecond), seen[len(seen)/2].Round(time.Millisecond),
		seen[len(seen)-1].Round(time.Millisecond))
	if last := seen[len(seen)-1]; last > bound {
		t.Fatalf("last agent reported the failure after %v, bound %v", last, bound)
	}
	for _, a := range others {
		if alive(a) != n-1 {
			t.Fatalf("%s sees %d alive, want %d", a.LocalName(), alive(a), n-1)
		}
	}
}
