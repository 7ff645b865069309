package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"
)

// event is one line of the nemesis timeline.
type event struct {
	At, End time.Duration // since the history began; End 0 = instant
	Kind    string
	Target  string
	Detail  string
}

func (e event) String() string {
	span := fmt.Sprintf("%8.3fs", e.At.Seconds())
	if e.End > 0 {
		span = fmt.Sprintf("%8.3fs-%.3fs", e.At.Seconds(), e.End.Seconds())
	}
	s := fmt.Sprintf("%-18s %-16s %s", span, e.Kind, e.Target)
	if e.Detail != "" {
		s += " " + e.Detail
	}
	return s
}

type timeline struct {
	h      *history
	mu     sync.Mutex
	events []event
}

func (tl *timeline) add(e event) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	tl.events = append(tl.events, e)
}

func (tl *timeline) list() []event {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	out := append([]event(nil), tl.events...)
	sort.SliceStable(out, func(i, j int) bool { return out[i].At < out[j].At })
	return out
}

// faults are the node and link faults the nemesis picks from, one at a
// time (so at most one node is down or cut off at once: the failure model
// ukai promises to survive).
var faults = []string{"kill", "pause", "partition-peer", "partition-consul", "consul-restart", "slow-peer", "reset-peer"}

// operatorActions are what an operator does in the middle of it.
var operatorActions = []string{"relocate", "replicas", "location-add", "location-remove", "snapshot", "attach", "detach", "resize", "cordon", "drain"}

type nemesis struct {
	c        *cluster
	tl       *timeline
	h        *history
	rng      *rand.Rand
	leaseTTL time.Duration
	gap      time.Duration // at most this long between two faults
	faults   []string
	logf     func(format string, args ...any)
}

func (nm *nemesis) hold(ctx context.Context, lo, hi time.Duration) {
	sleep(ctx, lo+time.Duration(nm.rng.Int64N(int64(hi-lo)+1)))
}

// run injects faults until ctx ends, then heals everything it broke.
func (nm *nemesis) run(ctx context.Context) {
	for ctx.Err() == nil {
		nm.hold(ctx, nm.gap/4, nm.gap)
		if ctx.Err() != nil || len(nm.faults) == 0 {
			return
		}
		kind := nm.faults[nm.rng.IntN(len(nm.faults))]
		n := nm.c.nodes[nm.rng.IntN(len(nm.c.nodes))]
		e := event{At: nm.h.since(time.Now()), Kind: kind, Target: n.name}
		// The fault lasts its chosen time even past ctx's end: a fault
		// cut short would heal on a schedule no seed chose.
		bg := context.Background()
		switch kind {
		case "kill":
			n.kill()
			nm.hold(bg, time.Second, 4*time.Second)
			if err := n.start(); err != nil {
				e.Detail = "restart error: " + err.Error()
			}
		case "pause":
			// Longer than the lease: the node's images are taken over
			// while it cannot know it lost them.
			n.pause()
			nm.hold(bg, nm.leaseTTL+500*time.Millisecond, nm.leaseTTL+3*time.Second)
			n.resume()
		case "partition-peer":
			// Nothing reaches the node's peer listener; its own calls to
			// the others still go out (an asymmetric cut).
			e.Detail = "error: " + errString(n.peerLink.add("timeout", map[string]any{"timeout": 0}))
			nm.hold(bg, 2*time.Second, 6*time.Second)
			n.peerLink.heal()
		case "partition-consul":
			e.Detail = "error: " + errString(n.consulLink.add("timeout", map[string]any{"timeout": 0}))
			nm.hold(bg, 2*time.Second, 8*time.Second)
			n.consulLink.heal()
		case "consul-restart":
			e.Target = "consul"
			nm.c.consul.Restart()
		case "slow-peer":
			lat := 50 + nm.rng.IntN(250)
			e.Detail = fmt.Sprintf("latency %dms", lat)
			if err := n.peerLink.add("latency", map[string]any{"latency": lat, "jitter": lat / 2}); err != nil {
				e.Detail += " error: " + err.Error()
			}
			nm.hold(bg, 3*time.Second, 8*time.Second)
			n.peerLink.heal()
		case "reset-peer":
			e.Detail = "error: " + errString(n.peerLink.add("reset_peer", map[string]any{"timeout": nm.rng.IntN(500)}))
			nm.hold(bg, time.Second, 3*time.Second)
			n.peerLink.heal()
		}
		e.Detail = strings.TrimSuffix(e.Detail, "error: ")
		e.End = nm.h.since(time.Now())
		nm.tl.add(e)
		nm.logf("nemesis: %s", e)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// operator changes images through the CLI of a random running node while
// the faults go on. A refusal (the last in-sync copy, a node down) is part
// of the timeline, not a failure of the run.
type operator struct {
	c      *cluster
	tl     *timeline
	h      *history
	rng    *rand.Rand
	images []imageSpec
	gap    time.Duration
	snaps  map[string][]string
	grown  map[string]int
	// cordoned is the node a cordon or drain of the run left cordoned
	// (one at a time; the next cordon or drain action uncordons it).
	cordoned string
	logf     func(format string, args ...any)
}

func (op *operator) run(ctx context.Context) {
	op.snaps, op.grown = map[string][]string{}, map[string]int{}
	defer func() {
		// The run ends with every node in service (the last fault may
		// still be on: an uncordon that fails is retried a few times).
		for try := 0; op.cordoned != "" && try < 5; try++ {
			if op.uncordon(op.cordoned) {
				op.cordoned = ""
			} else {
				time.Sleep(2 * time.Second)
			}
		}
	}()
	for i := 0; ctx.Err() == nil; i++ {
		sleep(ctx, op.gap/2+time.Duration(op.rng.Int64N(int64(op.gap))))
		if ctx.Err() != nil {
			return
		}
		img := op.images[op.rng.IntN(len(op.images))]
		kind := operatorActions[op.rng.IntN(len(operatorActions))]
		other := op.c.nodes[op.rng.IntN(len(op.c.nodes))].name
		var args []string
		switch kind {
		case "relocate":
			args = []string{"image", "relocate", img.name, "--to", other}
		case "replicas":
			args = []string{"image", "set", img.name, "--replicas", fmt.Sprint(1 + op.rng.IntN(3))}
		case "location-add":
			args = []string{"location", "add", img.name, other}
		case "location-remove":
			args = []string{"location", "remove", img.name, other}
		case "snapshot":
			if s := op.snaps[img.name]; len(s) > 0 && op.rng.IntN(2) == 0 {
				args = []string{"snapshot", "delete", img.name, s[0]}
				op.snaps[img.name] = s[1:]
				kind = "snapshot-delete"
			} else {
				name := fmt.Sprintf("%s-s%d", img.name, i)
				args = []string{"snapshot", "create", img.name, name}
				op.snaps[img.name] = append(s, name)
				kind = "snapshot-create"
			}
		case "attach":
			args = []string{"image", "attach", img.name, "--node", other}
		case "detach":
			args = []string{"image", "detach", img.name}
		case "resize":
			op.grown[img.name]++
			args = []string{"image", "resize", img.name, fmt.Sprintf("%dK", 2048+64*op.grown[img.name])}
		case "cordon", "drain":
			// A node's owners move away (and its copies, for a drain,
			// ignoring windows) while the faults go on; the next such
			// action ends it.
			target := other
			switch {
			case op.cordoned != "":
				target, kind = op.cordoned, "uncordon"
				args = []string{"node", "uncordon", target}
				if op.uncordon(target) {
					op.cordoned = "" // else the next one tries again
				}
				continue
			case kind == "cordon":
				args = []string{"node", "cordon", target, "--move-owners"}
				op.cordoned = target
			default:
				args = []string{"node", "drain", target, "--now", "--move-owners"}
				op.cordoned = target
			}
			op.do(kind, target, args)
			continue
		}
		op.do(kind, img.name, args)
	}
}

// uncordon uncordons node; done says it is not cordoned any more (also
// when an earlier attempt did it and its answer was lost).
func (op *operator) uncordon(node string) (done bool) {
	err := op.do("uncordon", node, []string{"node", "uncordon", node})
	return err == nil || strings.Contains(err.Error(), "is not cordoned")
}

// do runs one operator action through a running node and records it.
func (op *operator) do(kind, target string, args []string) error {
	via := op.running()
	e := event{At: op.h.since(time.Now()), Kind: kind, Target: target, Detail: strings.Join(args, " ") + " via " + via.name}
	// Bounded by its own timeout, not by ctx: an action cut off at the
	// end of the run would leave the timeline saying less than the
	// cluster saw.
	_, err := via.cli(context.Background(), args...)
	if err != nil {
		e.Detail += " error: " + firstLine(err.Error())
	}
	e.End = op.h.since(time.Now())
	op.tl.add(e)
	op.logf("operator: %s", e)
	return err
}

// running returns a random node that is running now (any node if none).
func (op *operator) running() *ukaiNode {
	start := op.rng.IntN(len(op.c.nodes))
	for i := range op.c.nodes {
		n := op.c.nodes[(start+i)%len(op.c.nodes)]
		if n.currentState() == "running" {
			return n
		}
	}
	return op.c.nodes[start]
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
