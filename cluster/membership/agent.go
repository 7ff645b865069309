package membership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrClosed is returned by calls on an agent that was shut down or left.
var ErrClosed = errors.New("membership: agent is shut down")

// defaultBroadcastWait bounds SetMeta and Leave when ctx has no deadline.
const defaultBroadcastWait = 10 * time.Second

// Agent is a node's membership agent. Its methods are safe for concurrent
// use.
type Agent struct {
	cfg  Config
	name string
	log  *slog.Logger
	ml   *memberlist.Memberlist

	metaMu sync.Mutex
	meta   []byte // encoded NodeMeta we gossip

	// mu guards the fields below. memberlist calls the delegates with
	// its own lock held, so mu is always taken after memberlist's lock
	// and memberlist is never called with mu held.
	mu       sync.Mutex
	members  map[string]*entry
	leaving  map[string]time.Time // leave intents received
	joining  int                  // Join calls in progress
	conflict *NameConflictError   // set by the delegates during a join
	events   chan Event
	dropped  uint64
	closed   bool

	lifeMu sync.Mutex // serialises Leave/Shutdown
	down   bool
}

// New starts an agent: it binds cfg.Bind, gossips meta and, if cfg.Join is
// not empty, contacts each seed once. It fails with a [*NameConflictError]
// if a live node already uses cfg.Name at another address, and with a
// [*JoinError] naming the seeds if none answered (see [Agent.Rejoin] to
// keep retrying instead). ctx bounds the join.
func New(ctx context.Context, cfg Config, meta NodeMeta) (*Agent, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	raw, err := encodeMeta(meta)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:     cfg,
		name:    cfg.Name,
		log:     cfg.Logger.With("node", cfg.Name),
		meta:    raw,
		members: make(map[string]*entry),
		leaving: make(map[string]time.Time),
		events:  make(chan Event, cfg.EventBuffer),
	}
	mc := cfg.memberlistConfig()
	d := delegate{a: a}
	mc.Delegate, mc.Events, mc.Merge, mc.Alive = d, d, d, d
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("membership: start memberlist on %s: %w", cfg.Bind, err)
	}
	a.ml = ml
	if len(cfg.Join) > 0 {
		if err := a.joinOnce(ctx, cfg.Join); err != nil {
			_ = a.Shutdown()
			return nil, err
		}
	}
	a.log.Info("membership: agent started", "addr", a.Addr(), "seeds", cfg.Join)
	return a, nil
}

// joinOnce contacts each seed once.
func (a *Agent) joinOnce(ctx context.Context, seeds []string) error {
	a.mu.Lock()
	a.joining++
	a.conflict = nil
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.joining--
		a.mu.Unlock()
	}()

	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := a.ml.Join(seeds)
		done <- result{n, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		return &JoinError{Seeds: seeds, Err: ctx.Err()}
	}
	a.mu.Lock()
	conflict := a.conflict
	a.mu.Unlock()
	if conflict != nil {
		return conflict
	}
	if r.n == 0 {
		if r.err == nil {
			r.err = errors.New("no seed answered")
		}
		return &JoinError{Seeds: seeds, Err: r.err}
	}
	a.log.Debug("membership: joined", "seeds_answered", r.n, "seeds", seeds)
	return nil
}

// Rejoin contacts seeds (cfg.Join if none are given) until one answers,
// retrying with backoff (ProbeInterval doubling up to 10 s) until ctx ends.
// Use it to start a node whose seeds may not be up yet (create the agent
// with an empty Join, then Rejoin), or to merge back after a partition.
// A [*NameConflictError] is returned at once; otherwise the last
// [*JoinError] when ctx ends.
func (a *Agent) Rejoin(ctx context.Context, seeds ...string) error {
	if len(seeds) == 0 {
		seeds = a.cfg.Join
	}
	if len(seeds) == 0 {
		return errors.New("membership: Rejoin: no seeds")
	}
	backoff := a.cfg.ProbeInterval
	for {
		if a.isDown() {
			return ErrClosed
		}
		err := a.joinOnce(ctx, seeds)
		var nc *NameConflictError
		if err == nil || errors.As(err, &nc) || ctx.Err() != nil {
			return err
		}
		a.log.Debug("membership: rejoin failed, retrying", "err", err, "in", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// LocalName returns this node's name.
func (a *Agent) LocalName() string { return a.name }

// Addr returns the gossip "ip:port" other nodes use to reach this one (the
// bound port when Bind asked for port 0).
func (a *Agent) Addr() string {
	if m, ok := a.Member(a.name); ok {
		return m.Addr
	}
	return ""
}

// Members returns every node this agent has ever seen, itself included,
// dead and left ones too, sorted by name.
func (a *Agent) Members() []Member {
	a.mu.Lock()
	out := make([]Member, 0, len(a.members))
	for _, e := range a.members {
		out = append(out, e.m.clone())
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Member returns the named node as seen by this agent.
func (a *Agent) Member(name string) (Member, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.members[name]
	if !ok {
		return Member{}, false
	}
	return e.m.clone(), true
}

// Events returns the agent's event stream, this node's own join included.
// It is buffered (Config.EventBuffer) and never blocks memberlist: when it
// is full the oldest event is dropped, so treat events as hints and
// [Agent.Members] as the truth. It is closed by Shutdown and Leave.
func (a *Agent) Events() <-chan Event { return a.events }

// SetMeta replaces this node's meta and broadcasts it. It fails if the
// meta does not fit in MetaMaxSize, and waits (bounded by ctx, or 10 s)
// until the update has been gossiped.
func (a *Agent) SetMeta(ctx context.Context, meta NodeMeta) error {
	raw, err := encodeMeta(meta)
	if err != nil {
		return err
	}
	if a.isDown() {
		return ErrClosed
	}
	a.metaMu.Lock()
	a.meta = raw
	a.metaMu.Unlock()
	return wait(ctx, func(timeout time.Duration) error {
		if err := a.ml.UpdateNode(timeout); err != nil {
			return fmt.Errorf("membership: broadcast meta: %w", err)
		}
		return nil
	})
}

// Leave leaves the cluster gracefully, then shuts the agent down: other
// nodes report this one as left, not dead. ctx bounds the whole call
// (10 s without a deadline); the agent is shut down even on error.
func (a *Agent) Leave(ctx context.Context) error {
	a.lifeMu.Lock()
	defer a.lifeMu.Unlock()
	if a.down {
		return ErrClosed
	}
	a.sendLeaveIntents(ctx)
	err := wait(ctx, func(timeout time.Duration) error {
		if err := a.ml.Leave(timeout); err != nil {
			return fmt.Errorf("membership: broadcast leave: %w", err)
		}
		return nil
	})
	a.mu.Lock()
	if m, ok := a.markGone(a.name, StateLeft, time.Now()); ok {
		a.push(Event{Member: m, Type: EventLeave})
	}
	a.mu.Unlock()
	if serr := a.shutdownLocked(); err == nil {
		err = serr
	}
	a.log.Info("membership: left the cluster", "err", err)
	return err
}

// sendLeaveIntents tells every live peer, over TCP, that this node is
// leaving, so that the dead message memberlist sends next is reported as
// a leave. Peers that cannot be reached in time see the node as dead.
func (a *Agent) sendLeaveIntents(ctx context.Context) {
	msg := []byte(leaveIntentPrefix + a.name)
	var wg sync.WaitGroup
	for _, n := range a.ml.Members() {
		if n.Name == a.name {
			continue
		}
		wg.Add(1)
		go func(n *memberlist.Node) {
			defer wg.Done()
			if err := a.ml.SendReliable(n, msg); err != nil {
				a.log.Debug("membership: leave intent not delivered", "to", n.Name, "err", err)
			}
		}(n)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// Shutdown stops the agent abruptly, without telling anyone (others will
// report it dead). It is idempotent.
func (a *Agent) Shutdown() error {
	a.lifeMu.Lock()
	defer a.lifeMu.Unlock()
	return a.shutdownLocked()
}

func (a *Agent) shutdownLocked() error {
	if a.down {
		return nil
	}
	a.down = true
	err := a.ml.Shutdown()
	a.mu.Lock()
	a.closed = true
	close(a.events)
	a.mu.Unlock()
	return err
}

func (a *Agent) isDown() bool {
	a.lifeMu.Lock()
	defer a.lifeMu.Unlock()
	return a.down
}

// wait runs f, which takes a memberlist timeout, bounded by ctx.
func wait(ctx context.Context, f func(timeout time.Duration) error) error {
	timeout := defaultBroadcastWait
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return ctx.Err()
		}
	}
	done := make(chan error, 1)
	go func() { done <- f(timeout) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
