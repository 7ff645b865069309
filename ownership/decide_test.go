package ownership

import "testing"

func TestDecide(t *testing.T) {
	base := Input{Self: "n1", Session: "s1", StoreReachable: true}
	with := func(f func(*Input)) Input { in := base; f(&in); return in }
	tests := []struct {
		name string
		in   Input
		want Action
	}{
		{"free lock", base, Acquire},
		{"held by our session", with(func(i *Input) { i.LockSession, i.LockNode = "s1", "n1" }), Take},
		{"held by a live node", with(func(i *Input) { i.LockSession, i.LockNode = "s2", "n2" }), Forward},
		{"held by a dead node", with(func(i *Input) { i.LockSession, i.LockNode, i.HolderDead = "s2", "n2", true }), Break},
		{"held by our previous session", with(func(i *Input) { i.LockSession, i.LockNode = "s0", "n1" }), Break},
		{"no valid session, free lock", with(func(i *Input) { i.Session = "" }), Wait},
		{"no valid session, our old lock", with(func(i *Input) { i.Session, i.LockSession, i.LockNode = "", "s1", "n1" }), Wait},
		{"no valid session, dead holder", with(func(i *Input) { i.Session, i.LockSession, i.LockNode, i.HolderDead = "", "s2", "n2", true }), Wait},
		{"store unreachable", with(func(i *Input) { i.StoreReachable = false }), Wait},
		{"store unreachable, only copy here", with(func(i *Input) { i.StoreReachable, i.OnlyLocalCopy = false, true }), Offline},
		{"store unreachable, only copy here, no session", with(func(i *Input) { i.StoreReachable, i.OnlyLocalCopy, i.Session = false, true, "" }), Offline},
		{"only copy here but store reachable: the lock decides", with(func(i *Input) { i.OnlyLocalCopy, i.LockSession, i.LockNode = true, "s2", "n2" }), Forward},
		{"free lock, attached to another live node", with(func(i *Input) { i.PinnedTo = "n2" }), Yield},
		{"free lock, attached elsewhere for longer than the hold", with(func(i *Input) { i.PinnedTo, i.PinWaited = "n2", PinHold }), Acquire},
		{"held by our session, attached elsewhere: a handover in progress", with(func(i *Input) { i.PinnedTo, i.LockSession, i.LockNode = "n2", "s1", "n1" }), Yield},
		{"held by our session, attached elsewhere for longer than the hold", with(func(i *Input) { i.PinnedTo, i.PinWaited, i.LockSession, i.LockNode = "n2", PinHold, "s1", "n1" }), Take},
		{"held by a live node, attached to a third", with(func(i *Input) { i.PinnedTo, i.LockSession, i.LockNode = "n2", "s3", "n3" }), Forward},
		{"held by a dead node, attached elsewhere: broken all the same", with(func(i *Input) { i.PinnedTo, i.LockSession, i.LockNode, i.HolderDead = "n2", "s3", "n3", true }), Break},
		{"attached elsewhere, no valid session", with(func(i *Input) { i.PinnedTo, i.Session = "n2", "" }), Wait},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Decide(tc.in); got != tc.want {
				t.Fatalf("Decide(%+v) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

// Two nodes that each decide on what they see never both serve from the
// lock: whatever the lock's state, at most one of them gets Take, and only
// the one whose session the lock names. (Offline serves without a lock:
// only for the node holding the only copy.)
func TestDecideAtMostOneTaker(t *testing.T) {
	sessions := []string{"", "s1", "s2", "s3"}
	nodes := []string{"", "n1", "n2", "n3"}
	for _, lockS := range sessions {
		for _, lockN := range nodes {
			takers := 0
			for _, self := range []struct{ node, session string }{{"n1", "s1"}, {"n2", "s2"}} {
				for _, dead := range []bool{false, true} {
					a := Decide(Input{Self: self.node, Session: self.session, LockSession: lockS, LockNode: lockN, HolderDead: dead, StoreReachable: true})
					if a == Take {
						if lockS != self.session {
							t.Fatalf("%s took a lock held by session %q", self.node, lockS)
						}
						takers++
						break
					}
				}
			}
			if takers > 1 {
				t.Fatalf("lock (%q, %q): %d takers", lockS, lockN, takers)
			}
		}
	}
}
