package placement

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Plan decides the next actions for every image of s, in image order. It
// is pure: no I/O, no goroutines, no clock (s.Now is the time), and the
// same State always gives the same actions. The image's owner runs it
// every few seconds and executes what it returns; nothing here assumes an
// action was executed.
//
// Per image, in this order (the rule names appear in the tests):
//
//	validate   ValidatePolicy or ValidateGroup fails → one Refuse with the
//	           reason; no copy is added or removed, rule sync still runs.
//	relocate   (rule 2) while Relocate is set and not done (RelocationDone):
//	           add To; To is synced by rule sync; once To is fully in sync,
//	           remove From (or, without From, one other copy chosen like
//	           rule replicas-down, only if more copies than Replicas remain;
//	           with Replicas 0 nothing is removed). Rules exact, replicas-*
//	           and replace are suspended meanwhile.
//	exact      (rule 1) Locations set: add each listed node that is not a
//	           location (Refuse if it is not alive); remove each location not
//	           listed when rule safe-remove allows, else Wait.
//	replicas-up   (rule 1) fewer present copies than Replicas: add nodes
//	           chosen by choose; Refuse for what no node can take.
//	replicas-down (rule 1) more present copies than Replicas: remove copies,
//	           preferring dead, then draining, then most blocks out of sync,
//	           then violating SpreadBy / not matching PreferLabels, then
//	           fewest group-affinity matches, then least free, then
//	           name, each only when rule safe-remove allows; else Wait with
//	           the reason (e.g. "n1 holds the last in-sync copy of block 17").
//	replace    (rule 6) a location on a node dead for longer than
//	           ReplaceAfter (> 0) is missing: it does not count as present
//	           (so replicas-up adds a replacement) and it is removed once
//	           every present alive copy is fully in sync and safe-remove
//	           allows. A copy on a node down for less gets a Wait until it
//	           would be replaced. Without Replicas, rule pin records the
//	           count first. Not applied to exact Locations (the operator
//	           named the nodes).
//	leave      (issue 18) a location on a Draining node, or on a node dead
//	           longer than ReplaceAfter, is leaving: it does not count as
//	           present (so replicas-up adds its replacement) and it is
//	           removed once every present alive copy is fully in sync and
//	           safe-remove allows; a leaving copy on a live node (drained,
//	           misplaced) only once as many present copies as wanted are
//	           live and fully in sync without it. A drained copy is
//	           replaced while fewer present copies than wanted are on live
//	           nodes. Under exact
//	           Locations a draining node is a Refuse naming it.
//	misplaced  a present copy on a live node breaking a label requirement
//	           (SpreadBy: sharing a value with a copy more in sync, or
//	           lacking the label; group anti-affinity: the same within the
//	           image, or a value a copy of another image of the group holds
//	           when this image's name sorts after the other's) is leaving
//	           too, if a node can take its place; else it stays with a Wait.
//	pin        an image without Replicas that has leaving copies, or that
//	           locality would give a copy, gets one SetReplicas with its
//	           current count first (the count must outlive the moves).
//	locality   (best-effort, strict) the owner, alive, eligible and owning
//	           the image without a copy for LocalityDelay, gets a copy when
//	           present copies are as many as wanted (replicas-up picks it
//	           first anyway); replicas-down then never removes the owner's
//	           copy. Not while a label rule is broken, nor onto a node that
//	           lacks the SpreadBy label or has a value the group's
//	           anti-affinity forbids: a Wait says why.
//	               Replicas-down runs only when nothing is added or leaving.
//	choose     new copies go to alive nodes that are not locations, neither
//	           Cordoned nor Draining, with a SpreadBy value no present copy
//	           (or earlier pick) has — nodes without the label do not
//	           qualify —, and under group anti-affinity a label value no
//	           copy of the group has; preferring the locality owner, then
//	           most PreferLabels matches, then most group-affinity matches
//	           (the group's other copies on the node's label value), then
//	           most Free (less the Size of the images this plan already
//	           placed there), then name.
//	safe-remove (rule 5) removing X is allowed only if at least one other
//	           location remains, and for every block X holds in sync some
//	           other remaining alive location holds it in sync (so X is never
//	           the last in-sync copy, nor the only source of a copy still
//	           syncing); and if X is alive, that block keeps at least
//	           min(wanted copies, its in-sync copies before) in-sync copies
//	           (no swap drops redundancy before the new copy is in sync;
//	           wanted copies here excludes remaining copies on dead nodes).
//	           Copies on dead nodes never count as remaining in-sync copies.
//	sync       (rule 3) each alive location, not removed by this plan, with
//	           blocks not in sync that some other alive location holds in
//	           sync: one Sync for the smallest range [From, To) covering
//	           those blocks, if EffectiveSync(s, img, node) is open at Now,
//	           with Deadline = when it closes (zero: never); else Wait with
//	           Until = the next opening. An image with a copy on a node
//	           drained with DrainNow syncs now, without window or cap.
//	           Blocks no alive copy holds in sync get a Wait naming them.
//	rate       (rule 4) see below.
//	refuse     (rule 7) what cannot be met now (no qualifying node, target
//	           down, invalid sync policy) gets a Refuse, and only for that
//	           part.
//
// Actions of one image come in the order set_replicas or add, sync,
// remove, wait, refuse.
//
// Rates (rule 4). The nodes a Sync involves are its destination and every
// other alive location holding some of the blocks in sync (the possible
// sources; the executor picks). Each involved node n has a cap: its
// PerNode MaxRate if it has a PerNode policy, else Default.MaxRate for
// images without their own Sync policy, else none. A node's cap is shared
// equally by the Syncs of this plan (all images) it applies to: the share
// is cap / count, at least 1 byte/s. The Sync's Rate is the minimum of the
// image's Sync.MaxRate and the shares of its involved nodes, over those
// that are not 0; 0 (no cap anywhere) means unlimited. So the Syncs on a
// node add up to at most its cap, e.g. two images syncing to one node
// capped at 100M get 50M each.
func Plan(s State) []Action {
	p := newPlanner(s)
	for i := range s.Images {
		p.planImage(&s.Images[i])
	}
	return p.finish()
}

// PlanImage returns the actions of Plan(s) for the image called name (nil
// if there is none). The whole state is planned so that rates account for
// the other images sharing a node.
func PlanImage(s State, name string) []Action {
	var out []Action
	for _, a := range Plan(s) {
		if a.Image == name {
			out = append(out, a)
		}
	}
	return out
}

// RelocationDone reports whether img's relocation, if any, has nothing
// left to do: To is a location whose copy is fully in sync, and From (if
// set) is no longer a location — without From, no more copies than
// Replicas remain (always, with Replicas 0). The executor clears
// Policy.Relocate when it is; Plan then plans the image as usual. An image
// without Relocate is done.
func RelocationDone(img ImageState) bool {
	r := img.Policy.Relocate
	if r == nil {
		return true
	}
	if !slices.Contains(img.Locations, r.To) {
		return false
	}
	m := img.Maps[r.To]
	if m == nil || m.Len() != numBlocks(img) || m.Count(InSync) != m.Len() {
		return false
	}
	if r.From != "" {
		return !slices.Contains(img.Locations, r.From)
	}
	return img.Policy.Replicas == 0 || len(img.Locations) <= img.Policy.Replicas
}

// numBlocks is the image's block count: from Size and BlockSize, else the
// longest map.
// Blocks is the image's number of blocks.
func (img ImageState) Blocks() int64 { return numBlocks(img) }

func numBlocks(img ImageState) int64 {
	if img.BlockSize > 0 {
		return (img.Size + img.BlockSize - 1) / img.BlockSize
	}
	var n int64
	for _, m := range img.Maps {
		if m != nil {
			n = max(n, m.Len())
		}
	}
	return n
}

// planner carries what Plan shares across images.
type planner struct {
	s     State
	nodes map[string]NodeInfo
	free  map[string]int64
	out   []Action
	syncs []syncInfo
}

type syncInfo struct {
	idx      int // into out
	involved []string
	imgCap   int64
	imgSync  bool
	drainNow bool // a drain --now: no cap
}

func newPlanner(s State) *planner {
	p := &planner{s: s, nodes: map[string]NodeInfo{}, free: map[string]int64{}}
	for _, n := range s.Nodes {
		p.nodes[n.Name] = n
		p.free[n.Name] = n.Free
	}
	return p
}

// view is one image being planned.
type view struct {
	p       *planner
	img     *ImageState
	n       int64
	maps    map[string]*BlockMap
	leaving map[string]string // rules replace, drain, misplaced: why the copy goes
	mis     []string          // the misplaced ones among leaving, in order
	adds    []Action
	syncs   []Action
	syncInv [][]string
	syncNow []bool
	removes []Action
	waits   []Action
	refuses []Action
	removed map[string]bool
	misWhy  map[string]string
}

func (v *view) alive(loc string) bool {
	n, ok := v.p.nodes[loc]
	return ok && n.Alive
}

// eligible says whether a new copy may go to node: alive, not cordoned,
// not draining.
func (v *view) eligible(node string) bool {
	n, ok := v.p.nodes[node]
	return ok && n.Alive && !n.Cordoned && !n.Draining
}

// notEligible says why node cannot take a new copy.
func (v *view) notEligible(node string) string {
	n, ok := v.p.nodes[node]
	switch {
	case !ok:
		return node + " is not a known node"
	case !n.Alive:
		return node + " is not alive"
	case n.Draining:
		return node + " is draining"
	case n.Cordoned:
		return node + " is cordoned"
	}
	return ""
}

// locality is the image's locality policy.
func (v *view) locality() Locality {
	if l := v.img.Policy.Locality; l != "" {
		return l
	}
	if v.p.s.Locality != "" {
		return v.p.s.Locality
	}
	return LocalityOff
}

// localOwner is the owner a copy should follow (locality on, the owner
// alive), or "".
func (v *view) localOwner() string {
	if l := v.locality(); l != LocalityBestEffort && l != LocalityStrict {
		return ""
	}
	if !v.alive(v.img.Owner) {
		return ""
	}
	return v.img.Owner
}

// group is the image's group rule, if any.
func (v *view) group() (GroupRule, bool) {
	if v.img.Policy.Group == "" {
		return GroupRule{}, false
	}
	g, ok := v.p.s.Groups[v.img.Policy.Group]
	return g, ok
}

// groupOthers are the other images of the image's group.
func (v *view) groupOthers() []GroupImage {
	var out []GroupImage
	for _, gi := range v.p.s.GroupImages[v.img.Policy.Group] {
		if gi.Name != v.img.Name {
			out = append(out, gi)
		}
	}
	return out
}

// affinityScore counts the group's other copies on nodes with node's
// value of the affinity label (0 without an affinity rule).
func (v *view) affinityScore(node string) int {
	g, ok := v.group()
	if !ok || g.Kind != Affinity {
		return 0
	}
	val, has := v.p.nodes[node].Labels[g.Label]
	if !has {
		return 0
	}
	c := 0
	for _, o := range v.groupOthers() {
		for _, l := range o.Locations {
			if x, ok := v.p.nodes[l].Labels[g.Label]; ok && x == val {
				c++
			}
		}
	}
	return c
}

func (v *view) inSync(loc string, b int64) bool { return v.maps[loc].Get(b) == InSync }

func (v *view) outOfSync(loc string) int64 { return v.n - v.maps[loc].Count(InSync) }

func (v *view) act(k ActionKind, node, reason string) Action {
	return Action{Kind: k, Image: v.img.Name, Node: node, Reason: reason}
}

func (v *view) refuse(node, f string, a ...any) {
	v.refuses = append(v.refuses, v.act(Refuse, node, fmt.Sprintf(f, a...)))
}

func (v *view) wait(node string, until time.Time, f string, a ...any) {
	w := v.act(Wait, node, fmt.Sprintf(f, a...))
	w.Until = until
	v.waits = append(v.waits, w)
}

func (p *planner) planImage(img *ImageState) {
	v := &view{p: p, img: img, n: numBlocks(*img), maps: map[string]*BlockMap{},
		leaving: map[string]string{}, removed: map[string]bool{}}
	for _, l := range img.Locations {
		m := img.Maps[l]
		if m == nil || m.Len() != v.n {
			m = NewBlockMap(v.n, OutOfSync) // unknown state: never a source
		}
		v.maps[l] = m
	}
	valid := true
	if err := validatePolicy(img.Policy, *img, p.s.Nodes, true); err != nil {
		v.refuse("", "policy refused: %v", err)
		valid = false
	} else if err := ValidateGroup(p.s, *img); err != nil {
		v.refuse("", "group refused: %v", err)
		valid = false
	}
	pol := img.Policy
	switch {
	case !valid:
		// Copies stay where they are; the blocks they lack are still
		// synchronized (a policy that nodes leaving made impossible must
		// not also stop the repair of what exists).
	case pol.Relocate != nil && !RelocationDone(v.snapshot()):
		v.relocate()
	case len(pol.Locations) > 0:
		v.exact()
	default:
		v.replicas()
	}
	v.sync()
	p.out = append(p.out, v.adds...)
	for i, a := range v.syncs {
		p.syncs = append(p.syncs, syncInfo{idx: len(p.out), involved: v.syncInv[i],
			imgCap: v.imgCap(), imgSync: img.Sync != nil, drainNow: v.syncNow[i]})
		p.out = append(p.out, a)
	}
	p.out = append(p.out, v.removes...)
	p.out = append(p.out, v.waits...)
	p.out = append(p.out, v.refuses...)
}

// snapshot is the image with the normalised maps.
func (v *view) snapshot() ImageState {
	c := *v.img
	c.Maps = v.maps
	return c
}

func (v *view) imgCap() int64 {
	if v.img.Sync != nil {
		return v.img.Sync.MaxRate
	}
	return 0
}

// present are the locations not leaving, in location order.
func (v *view) present() []string {
	var out []string
	for _, l := range v.img.Locations {
		if _, gone := v.leaving[l]; !gone {
			out = append(out, l)
		}
	}
	return out
}

// kept are the locations not removed by this plan.
func (v *view) kept(locs []string) []string {
	var out []string
	for _, l := range locs {
		if !v.removed[l] {
			out = append(out, l)
		}
	}
	return out
}

// safeRemove is rule safe-remove for x, given the removals already
// planned and the number of copies wanted.
func (v *view) safeRemove(x string, want int) (bool, string) {
	remaining, deadRemaining := 0, 0
	for _, l := range v.img.Locations {
		if l != x && !v.removed[l] {
			remaining++
			if !v.alive(l) {
				deadRemaining++
			}
		}
	}
	wantAlive := want - deadRemaining // copies on dead nodes cannot hold redundancy
	if remaining < 1 {
		return false, fmt.Sprintf("%s is the last copy", x)
	}
	xAlive := v.alive(x)
	for b := int64(0); b < v.n; b++ {
		if !v.inSync(x, b) {
			continue
		}
		others := 0
		for _, l := range v.img.Locations {
			if l != x && !v.removed[l] && v.alive(l) && v.inSync(l, b) {
				others++
			}
		}
		if others == 0 {
			return false, fmt.Sprintf("%s holds the last in-sync copy of block %d", x, b)
		}
		if xAlive {
			if need := min(wantAlive, others+1); others < need {
				return false, fmt.Sprintf("removing %s would leave block %d with %d in-sync %s (%d wanted)", x, b, others, plural(others, "copy", "copies"), need)
			}
		}
	}
	return true, ""
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// preferScore counts the PreferLabels a node matches.
func (v *view) preferScore(name string) int {
	n := v.p.nodes[name]
	c := 0
	for k, want := range v.img.Policy.PreferLabels {
		if n.Labels[k] == want {
			c++
		}
	}
	return c
}

// pick is one node choose selected, with why.
type pick struct {
	node   string
	detail string
}

// choose is rule choose: up to k new nodes for the image.
func (v *view) choose(k int) ([]pick, string) {
	pol := v.img.Policy
	used := map[string]bool{}
	if pol.SpreadBy != "" {
		for _, l := range v.present() {
			if val, ok := v.p.nodes[l].Labels[pol.SpreadBy]; ok {
				used[val] = true
			}
		}
	}
	// Anti-affinity: the values of the label every copy of the group
	// holds (this image's present ones and the others' all).
	g, hasGroup := v.group()
	anti := hasGroup && g.Kind == AntiAffinity
	groupUsed := map[string]bool{}
	if anti {
		for _, l := range v.present() {
			if val, ok := v.p.nodes[l].Labels[g.Label]; ok {
				groupUsed[val] = true
			}
		}
		for _, o := range v.groupOthers() {
			for _, l := range o.Locations {
				if val, ok := v.p.nodes[l].Labels[g.Label]; ok {
					groupUsed[val] = true
				}
			}
		}
	}
	exclude := map[string]bool{}
	for _, l := range v.img.Locations {
		exclude[l] = true
	}
	owner := v.localOwner()
	var picks []pick
	for range k {
		var cands []NodeInfo
		skipped := 0 // cordoned or draining
		for _, n := range v.p.s.Nodes {
			if !n.Alive || exclude[n.Name] {
				continue
			}
			if n.Cordoned || n.Draining {
				skipped++
				continue
			}
			if pol.SpreadBy != "" {
				val, ok := n.Labels[pol.SpreadBy]
				if !ok || used[val] {
					continue
				}
			}
			if anti {
				val, ok := n.Labels[g.Label]
				if !ok || groupUsed[val] {
					continue
				}
			}
			cands = append(cands, n)
		}
		if len(cands) == 0 {
			why := "no alive node outside the current locations"
			if pol.SpreadBy != "" {
				vals := make([]string, 0, len(used))
				for u := range used {
					vals = append(vals, u)
				}
				sort.Strings(vals)
				why = fmt.Sprintf("no alive node outside the current locations with a %s not already used (%s)", pol.SpreadBy, strings.Join(vals, ", "))
			}
			if anti {
				vals := make([]string, 0, len(groupUsed))
				for u := range groupUsed {
					vals = append(vals, u)
				}
				sort.Strings(vals)
				why += fmt.Sprintf("; group %s anti-affinity by %s: %s already used by the group", pol.Group, g.Label, strings.Join(vals, ", "))
			}
			if skipped > 0 {
				why += fmt.Sprintf(" (%d cordoned or draining %s not counted)", skipped, plural(skipped, "node", "nodes"))
			}
			return picks, why
		}
		sort.SliceStable(cands, func(i, j int) bool {
			a, b := cands[i], cands[j]
			if oa, ob := a.Name == owner, b.Name == owner; oa != ob {
				return oa
			}
			if sa, sb := v.preferScore(a.Name), v.preferScore(b.Name); sa != sb {
				return sa > sb
			}
			if aa, ab := v.affinityScore(a.Name), v.affinityScore(b.Name); aa != ab {
				return aa > ab
			}
			if fa, fb := v.p.free[a.Name], v.p.free[b.Name]; fa != fb {
				return fa > fb
			}
			return a.Name < b.Name
		})
		c := cands[0]
		var d []string
		if c.Name == owner {
			d = append(d, "owner, locality "+string(v.locality()))
		}
		if pol.SpreadBy != "" {
			val := c.Labels[pol.SpreadBy]
			used[val] = true
			d = append(d, pol.SpreadBy+" "+val)
		}
		if anti {
			val := c.Labels[g.Label]
			groupUsed[val] = true
			d = append(d, fmt.Sprintf("group %s anti-affinity: %s %s unused", pol.Group, g.Label, val))
		}
		if sc := v.affinityScore(c.Name); sc > 0 {
			d = append(d, fmt.Sprintf("group %s affinity: %s %s holds %d of its copies", pol.Group, g.Label, c.Labels[g.Label], sc))
		}
		if len(pol.PreferLabels) > 0 {
			if sc := v.preferScore(c.Name); sc == len(pol.PreferLabels) {
				d = append(d, "preferred labels")
			} else if sc > 0 {
				d = append(d, fmt.Sprintf("%d of %d preferred labels", sc, len(pol.PreferLabels)))
			} else {
				d = append(d, "no node has the preferred labels")
			}
		}
		tie := len(cands) > 1 && c.Name != owner && v.preferScore(c.Name) == v.preferScore(cands[1].Name) && v.affinityScore(c.Name) == v.affinityScore(cands[1].Name)
		if tie && v.p.free[c.Name] > v.p.free[cands[1].Name] {
			d = append(d, "most free space")
		} else if tie && v.p.free[c.Name] == v.p.free[cands[1].Name] {
			d = append(d, "first by name among equals")
		}
		if len(cands) == 1 {
			d = append(d, "only candidate")
		}
		exclude[c.Name] = true
		v.p.free[c.Name] -= v.img.Size
		picks = append(picks, pick{c.Name, strings.Join(d, ", ")})
	}
	return picks, ""
}

func (v *view) add(node, reason string) {
	v.adds = append(v.adds, v.act(AddLocation, node, reason))
}

func (v *view) remove(node, reason string) {
	v.removed[node] = true
	v.removes = append(v.removes, v.act(RemoveLocation, node, reason))
}

// removalOrder sorts candidates by rule replicas-down's preference and
// says why each is a candidate.
func (v *view) removalOrder(cands []string) ([]string, map[string]string) {
	pol := v.img.Policy
	spreadBad := func(x string) (bool, string) {
		if pol.SpreadBy == "" {
			return false, ""
		}
		val, ok := v.p.nodes[x].Labels[pol.SpreadBy]
		if !ok {
			return true, "no " + pol.SpreadBy + " label"
		}
		for _, l := range v.img.Locations {
			if l != x && !v.removed[l] && v.p.nodes[l].Labels[pol.SpreadBy] == val {
				return true, fmt.Sprintf("shares %s %s with %s", pol.SpreadBy, val, l)
			}
		}
		return false, ""
	}
	badness := func(x string) int {
		b := len(pol.PreferLabels) - v.preferScore(x)
		if bad, _ := spreadBad(x); bad {
			b += 1 << 20
		}
		return b
	}
	draining := func(x string) bool { return v.p.nodes[x].Draining }
	out := slices.Clone(cands)
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if da, db := !v.alive(a), !v.alive(b); da != db {
			return da
		}
		if da, db := draining(a), draining(b); da != db {
			return da
		}
		if oa, ob := v.outOfSync(a), v.outOfSync(b); oa != ob {
			return oa > ob
		}
		if ba, bb := badness(a), badness(b); ba != bb {
			return ba > bb
		}
		if aa, ab := v.affinityScore(a), v.affinityScore(b); aa != ab {
			return aa < ab
		}
		if fa, fb := v.p.nodes[a].Free, v.p.nodes[b].Free; fa != fb {
			return fa < fb
		}
		return a < b
	})
	why := map[string]string{}
	for i, x := range out {
		var d []string
		if !v.alive(x) {
			d = append(d, "node down")
		}
		if draining(x) {
			d = append(d, "node draining")
		}
		if o := v.outOfSync(x); o > 0 {
			d = append(d, fmt.Sprintf("%d %s not in sync", o, plural(int(o), "block", "blocks")))
		}
		if bad, s := spreadBad(x); bad {
			d = append(d, s)
		}
		if len(pol.PreferLabels) > 0 && v.preferScore(x) < len(pol.PreferLabels) {
			d = append(d, "not matching preferred labels")
		}
		if len(d) == 0 {
			if i == 0 && len(out) > 1 && v.p.nodes[x].Free < v.p.nodes[out[1]].Free {
				d = append(d, "least free space")
			} else {
				d = append(d, "first by name among equals")
			}
		}
		why[x] = strings.Join(d, ", ")
	}
	return out, why
}

// removeSome removes up to k of cands (rule replicas-down); it returns how
// many it removed and, if fewer than k, the first reason it could not.
func (v *view) removeSome(k int, cands []string, want int, prefix string) (int, string) {
	order, why := v.removalOrder(cands)
	done := 0
	blocked := ""
	for _, x := range order {
		if done == k {
			break
		}
		ok, reason := v.safeRemove(x, want)
		if !ok {
			if blocked == "" {
				blocked = reason
			}
			continue
		}
		v.remove(x, fmt.Sprintf("%s: remove %s (%s)", prefix, x, why[x]))
		done++
	}
	return done, blocked
}

// exact is rule exact.
func (v *view) exact() {
	pol := v.img.Policy
	prefix := fmt.Sprintf("locations %s wanted", strings.Join(pol.Locations, ","))
	for _, l := range pol.Locations {
		if slices.Contains(v.img.Locations, l) {
			continue
		}
		if !v.alive(l) {
			v.refuse(l, "%s: cannot add %s, its node is not alive", prefix, l)
			continue
		}
		if why := v.notEligible(l); why != "" {
			v.refuse(l, "%s: cannot add %s: %s", prefix, l, why)
			continue
		}
		v.add(l, fmt.Sprintf("%s: add %s", prefix, l))
		v.p.free[l] -= v.img.Size
	}
	for _, l := range v.img.Locations {
		if slices.Contains(pol.Locations, l) {
			if v.p.nodes[l].Draining {
				v.refuse(l, "%s: %s is draining but the image's locations name it: set the image's locations without it", prefix, l)
			}
			continue
		}
		if ok, reason := v.safeRemove(l, len(pol.Locations)); ok {
			v.remove(l, fmt.Sprintf("%s: remove %s (not listed)", prefix, l))
		} else {
			v.wait(l, time.Time{}, "%s: cannot remove %s yet: %s", prefix, l, reason)
		}
	}
}

// replicas is rules leave, misplaced, locality, replicas-up,
// replicas-down and replace.
func (v *view) replicas() {
	pol := v.img.Policy
	s := v.p.s
	// Rule leave: copies on a draining node, or on a node dead longer
	// than ReplaceAfter, are replaced and then removed.
	for _, l := range v.img.Locations {
		n, known := v.p.nodes[l]
		switch {
		case known && n.Draining:
			v.leaving[l] = l + " is draining"
		case !v.alive(l) && s.ReplaceAfter > 0:
			if known && s.Now.Sub(n.DeadSince) < s.ReplaceAfter {
				at := n.DeadSince.Add(s.ReplaceAfter)
				v.wait(l, at, "%s is down since %s: replaced at %s unless it comes back", l, n.DeadSince.UTC().Format(time.RFC3339), at.UTC().Format(time.RFC3339))
				continue
			}
			if known {
				v.leaving[l] = fmt.Sprintf("%s is down since %s, longer than replace_after %s", l, n.DeadSince.UTC().Format(time.RFC3339), s.ReplaceAfter)
			} else {
				v.leaving[l] = fmt.Sprintf("%s is not a known node (replace_after %s)", l, s.ReplaceAfter)
			}
		}
	}
	mis := v.misplaced()
	owner, ownerWait := v.localityAdd()
	if pol.Replicas == 0 && (len(v.leaving) > 0 || len(mis) > 0 || owner != "") {
		var why []string
		for _, l := range v.img.Locations {
			if r, ok := v.leaving[l]; ok {
				why = append(why, r)
			}
		}
		for _, l := range mis {
			why = append(why, mis1(v, l))
		}
		if owner != "" {
			why = append(why, "locality adds a copy on the owner "+owner)
		}
		a := v.act(SetReplicas, "", fmt.Sprintf("replicas not set: keep the %d %s the image has while copies move (%s)",
			len(v.img.Locations), plural(len(v.img.Locations), "copy", "copies"), strings.Join(why, "; ")))
		a.Count = len(v.img.Locations)
		v.adds = append(v.adds, a)
		clear(v.leaving)
		return
	}
	if ownerWait != nil {
		v.waits = append(v.waits, *ownerWait)
	}
	for _, l := range mis {
		v.leaving[l] = mis1(v, l)
	}
	v.mis = mis
	want := pol.Replicas
	present := v.present()
	if want == 0 {
		want = len(present)
	}
	prefix := fmt.Sprintf("replicas %d wanted, %d present", want, len(present))
	k := want - len(present)
	// A drained copy is replaced as long as the present copies on live
	// nodes are fewer than wanted: copies on dead nodes hold no
	// redundancy, so they do not stand in for it. (Not for a misplaced
	// copy: it stays when nothing can take its place, and a replacement
	// added for it while a dead copy counts would be trimmed again.)
	for _, l := range v.img.Locations {
		if _, ok := v.leaving[l]; ok && v.alive(l) && v.p.nodes[l].Draining {
			alive := 0
			for _, p := range present {
				if v.alive(p) {
					alive++
				}
			}
			k = max(k, want-alive)
			break
		}
	}
	if k > 0 {
		picks, why := v.choose(k)
		unplaced := k - len(picks)
		// A misplaced copy whose replacement finds no node stays (it
		// still holds data and redundancy); the latest ones first.
		for i := len(mis) - 1; i >= 0 && unplaced > 0; i-- {
			l := mis[i]
			v.wait(l, time.Time{}, "%s, but no node can take its place: %s", v.leaving[l], why)
			delete(v.leaving, l)
			v.mis = slices.DeleteFunc(v.mis, func(x string) bool { return x == l })
			unplaced--
		}
		var goes []string
		for _, l := range v.img.Locations {
			if _, ok := v.leaving[l]; ok {
				goes = append(goes, l)
			}
		}
		for i, pk := range picks {
			r := fmt.Sprintf("%s: add %s (%s)", prefix, pk.node, pk.detail)
			if i < len(goes) {
				r += fmt.Sprintf("; replaces %s: %s", goes[i], v.leaving[goes[i]])
			}
			v.add(pk.node, r)
		}
		if unplaced > 0 {
			v.refuse("", "%s: cannot place %d more: %s", prefix, unplaced, why)
		}
	}
	present = v.present()
	switch {
	case len(v.adds) > 0 || len(v.leaving) > 0:
		// Copies are moving: the surplus, if any, is trimmed once they
		// have (else a replacement still filling, the copy most out of
		// sync, would be the first to go).
	case owner != "" && len(present) == want:
		v.add(owner, fmt.Sprintf("locality %s: %s owns the image without a copy since %s: add %s; once it is in sync one other copy goes",
			v.locality(), owner, v.img.OwnerSince.UTC().Format(time.RFC3339), owner))
		v.p.free[owner] -= v.img.Size
	case len(present) > want:
		k := len(present) - want
		cands := present
		if o := v.localOwner(); o != "" && slices.Contains(present, o) {
			// Locality: the owner's copy is the one that stays.
			cands = slices.DeleteFunc(slices.Clone(present), func(x string) bool { return x == o })
		}
		done, blocked := v.removeSome(k, cands, want, prefix)
		if done < k {
			v.wait("", time.Time{}, "%s: cannot remove %d more yet: %s", prefix, k-done, blocked)
		}
	}
	// Rule replace: remove leaving copies once the present ones are in
	// sync (present again: a misplaced copy may have been kept above).
	kept := v.kept(v.present())
	for _, l := range v.img.Locations {
		why, ok := v.leaving[l]
		if !ok {
			continue
		}
		ready := len(kept) >= want
		var lagging string
		liveInSync := 0
		for _, k := range kept {
			if !v.alive(k) {
				continue
			}
			if v.outOfSync(k) > 0 {
				ready = false
				if lagging == "" {
					lagging = k
				}
			} else {
				liveInSync++
			}
		}
		// A copy on a live node (drained, misplaced) holds redundancy: it
		// goes only once as many copies as wanted are live and in sync
		// without it. Kept copies on dead nodes do not stand in (a
		// replacement whose node died before it was filled would
		// otherwise let the drained copy go, leaving one copy).
		if v.alive(l) && liveInSync < want {
			ready = false
		}
		if !ready {
			if lagging == "" {
				lagging = "a replacement is"
			} else {
				lagging += " is"
			}
			v.wait(l, time.Time{}, "%s: remove it once %s in sync on a live node", why, lagging)
			continue
		}
		if ok, reason := v.safeRemove(l, want); ok {
			v.remove(l, fmt.Sprintf("%s and its replacement is in sync: remove it", why))
		} else {
			v.wait(l, time.Time{}, "%s: cannot remove it yet: %s", why, reason)
		}
	}
}

// mis1 is why the misplaced copy l goes.
func mis1(v *view, l string) string { return v.misWhy[l] }

// misplaced is rule misplaced: the present copies on live nodes that
// break a requirement on labels, in location order, with the reason in
// v.misWhy. SpreadBy: of the copies sharing a value, the one with the
// fewest blocks out of sync (then the first) stays, the others go, as do
// copies without the label. Group anti-affinity: likewise within the
// image, and a copy on a value a copy of another image of the group holds
// goes when this image's name sorts after the other's (so of two images
// in conflict exactly one moves). A copy leaves only once a node can take
// its place (rule replicas-up restores it otherwise).
func (v *view) misplaced() []string {
	v.misWhy = map[string]string{}
	var out []string
	mark := func(l, why string) {
		if _, ok := v.misWhy[l]; !ok {
			v.misWhy[l] = why
			out = append(out, l)
		}
	}
	var live []string
	for _, l := range v.present() {
		if v.alive(l) {
			live = append(live, l)
		}
	}
	// best first: the owner's copy under locality (else locality would
	// add it again), then fewest blocks out of sync, then location order
	owner := v.localOwner()
	best := slices.Clone(live)
	sort.SliceStable(best, func(i, j int) bool {
		if oi, oj := best[i] == owner, best[j] == owner; oi != oj {
			return oi
		}
		return v.outOfSync(best[i]) < v.outOfSync(best[j])
	})
	distinct := func(label, what string) {
		seen := map[string]string{}
		for _, l := range best {
			val, ok := v.p.nodes[l].Labels[label]
			if !ok {
				mark(l, fmt.Sprintf("%s has no %s label (%s)", l, label, what))
				continue
			}
			if o, dup := seen[val]; dup {
				mark(l, fmt.Sprintf("%s shares %s %s with %s (%s)", l, label, val, o, what))
				continue
			}
			seen[val] = l
		}
	}
	if by := v.img.Policy.SpreadBy; by != "" {
		distinct(by, "spread by "+by)
	}
	if g, ok := v.group(); ok && g.Kind == AntiAffinity {
		what := fmt.Sprintf("group %s anti-affinity by %s", v.img.Policy.Group, g.Label)
		distinct(g.Label, what)
		for _, l := range best {
			val, ok := v.p.nodes[l].Labels[g.Label]
			if !ok {
				continue
			}
			for _, o := range v.groupOthers() {
				if o.Name > v.img.Name {
					continue
				}
				for _, ol := range o.Locations {
					if x, ok := v.p.nodes[ol].Labels[g.Label]; ok && x == val {
						mark(l, fmt.Sprintf("%s %s also holds %s's copy on %s (%s)", g.Label, val, o.Name, ol, what))
					}
				}
			}
		}
	}
	// location order, for stable plans
	sort.SliceStable(out, func(i, j int) bool {
		return slices.Index(v.img.Locations, out[i]) < slices.Index(v.img.Locations, out[j])
	})
	return out
}

// localityAdd is rule locality: the owner to add a copy on now, or a Wait
// saying when (or why not).
func (v *view) localityAdd() (string, *Action) {
	o := v.localOwner()
	if o == "" || slices.Contains(v.img.Locations, o) {
		return "", nil
	}
	mode := v.locality()
	w := func(until time.Time, f string, a ...any) *Action {
		x := v.act(Wait, o, fmt.Sprintf("locality %s: ", mode)+fmt.Sprintf(f, a...))
		x.Until = until
		return &x
	}
	if why := v.notEligible(o); why != "" {
		return "", w(time.Time{}, "the owner %s has no copy, but %s", o, why)
	}
	if by := v.img.Policy.SpreadBy; by != "" {
		if _, ok := v.p.nodes[o].Labels[by]; !ok {
			// Its copy would be misplaced at once (and removed, and
			// added again).
			return "", w(time.Time{}, "the owner %s has no %s label (spread by %s)", o, by, by)
		}
	}
	if len(v.misWhy) > 0 {
		return "", w(time.Time{}, "the owner %s has no copy, but the copies break a label rule first (%s)", o, v.misWhy[v.img.Locations[slices.IndexFunc(v.img.Locations, func(l string) bool { _, ok := v.misWhy[l]; return ok })]])
	}
	if g, ok := v.group(); ok && g.Kind == AntiAffinity {
		val, has := v.p.nodes[o].Labels[g.Label]
		if !has {
			return "", w(time.Time{}, "the owner %s has no %s label (group %s anti-affinity)", o, g.Label, v.img.Policy.Group)
		}
		for _, gi := range v.groupOthers() {
			for _, l := range gi.Locations {
				if v.p.nodes[l].Labels[g.Label] == val {
					return "", w(time.Time{}, "%s %s of the owner %s holds %s's copy (group %s anti-affinity)", g.Label, val, o, gi.Name, v.img.Policy.Group)
				}
			}
		}
	}
	if at := v.img.OwnerSince.Add(v.p.s.LocalityDelay); v.p.s.Now.Before(at) {
		return "", w(at, "%s owns the image without a copy since %s: a copy is added there at %s if it still does", o, v.img.OwnerSince.UTC().Format(time.RFC3339), at.UTC().Format(time.RFC3339))
	}
	return o, nil
}

// relocate is rule relocate (rule 2), while not done.
func (v *view) relocate() {
	r := v.img.Policy.Relocate
	prefix := "relocate to " + r.To
	if r.From != "" {
		prefix = fmt.Sprintf("relocate %s → %s", r.From, r.To)
	}
	if !v.alive(r.To) {
		v.refuse(r.To, "%s: %s is not alive", prefix, r.To)
		return
	}
	if !slices.Contains(v.img.Locations, r.To) {
		if why := v.notEligible(r.To); why != "" {
			v.refuse(r.To, "%s: %s", prefix, why)
			return
		}
		v.add(r.To, fmt.Sprintf("%s: add %s", prefix, r.To))
		v.p.free[r.To] -= v.img.Size
		return
	}
	if o := v.outOfSync(r.To); o > 0 {
		return // rule sync fills To
	}
	if r.From != "" {
		if ok, reason := v.safeRemove(r.From, len(v.img.Locations)-1); ok {
			v.remove(r.From, fmt.Sprintf("%s: %s is in sync, remove %s", prefix, r.To, r.From))
		} else {
			v.wait(r.From, time.Time{}, "%s: cannot remove %s yet: %s", prefix, r.From, reason)
		}
		return
	}
	want := v.img.Policy.Replicas
	if want == 0 || len(v.img.Locations) <= want {
		return
	}
	var others []string
	for _, l := range v.img.Locations {
		if l != r.To {
			others = append(others, l)
		}
	}
	k := len(v.img.Locations) - want
	p := fmt.Sprintf("%s: %s is in sync, replicas %d wanted, %d present", prefix, r.To, want, len(v.img.Locations))
	if done, blocked := v.removeSome(k, others, want, p); done < k {
		v.wait("", time.Time{}, "%s: cannot remove yet: %s", p, blocked)
	}
}

// sync is rule sync (rule 3).
func (v *view) sync() {
	for _, x := range v.img.Locations {
		if v.removed[x] || !v.alive(x) {
			continue
		}
		lo, hi := int64(-1), int64(-1)
		var need, orphan int64
		firstOrphan := int64(-1)
		srcs := map[string]bool{}
		for b := int64(0); b < v.n; b++ {
			if v.inSync(x, b) {
				continue
			}
			need++
			found := false
			for _, l := range v.img.Locations {
				if l != x && v.alive(l) && v.inSync(l, b) {
					found = true
					srcs[l] = true
				}
			}
			if !found {
				orphan++
				if firstOrphan < 0 {
					firstOrphan = b
				}
				continue
			}
			if lo < 0 {
				lo = b
			}
			hi = b + 1
		}
		if need == 0 {
			continue
		}
		if orphan > 0 {
			v.wait(x, time.Time{}, "%s: %d %s (first %d) have no alive in-sync copy to sync from", x, orphan, plural(int(orphan), "block", "blocks"), firstOrphan)
		}
		if lo < 0 {
			continue
		}
		if v.img.SyncPaused {
			// The operator's pause wins over windows and drains: the
			// copy waits until `ukai image sync IMAGE --resume`.
			v.wait(x, time.Time{}, "%s has %d of %d %s not in sync; sync paused by the operator (ukai image sync %s --resume)",
				x, need-orphan, v.n, plural(int(v.n), "block", "blocks"), v.img.Name)
			continue
		}
		if now := v.drainNow(); now != "" {
			var src []string
			for _, l := range v.img.Locations {
				if srcs[l] {
					src = append(src, l)
				}
			}
			a := v.act(Sync, x, fmt.Sprintf("%s has %d of %d %s not in sync: sync blocks [%d,%d) from %s now (drain --now of %s: no window)",
				x, need-orphan, v.n, plural(int(v.n), "block", "blocks"), lo, hi, strings.Join(src, ","), now))
			a.From, a.To = lo, hi
			v.syncs = append(v.syncs, a)
			v.syncInv = append(v.syncInv, append([]string{x}, src...))
			v.syncNow = append(v.syncNow, true)
			continue
		}
		pol := EffectiveSync(v.p.s, *v.img, x)
		if err := pol.Validate(); err != nil {
			v.refuse(x, "sync to %s: invalid sync policy: %v", x, err)
			continue
		}
		var src []string
		for _, l := range v.img.Locations {
			if srcs[l] {
				src = append(src, l)
			}
		}
		open, closes, opens := pol.Open(v.p.s.Now)
		what := fmt.Sprintf("%s has %d of %d %s not in sync", x, need-orphan, v.n, plural(int(v.n), "block", "blocks"))
		if !open {
			when := "no opening within 8 days"
			if !opens.IsZero() {
				when = "until " + opens.UTC().Format(time.RFC3339)
			}
			v.wait(x, opens, "%s; sync window %s closed, %s", what, pol.describe(), when)
			continue
		}
		r := fmt.Sprintf("%s: sync blocks [%d,%d) from %s", what, lo, hi, strings.Join(src, ","))
		if !closes.IsZero() {
			r += fmt.Sprintf(" until %s (window %s)", closes.UTC().Format(time.RFC3339), pol.describe())
		}
		a := v.act(Sync, x, r)
		a.From, a.To, a.Deadline = lo, hi, closes
		v.syncs = append(v.syncs, a)
		v.syncInv = append(v.syncInv, append([]string{x}, src...))
		v.syncNow = append(v.syncNow, false)
	}
}

// drainNow is the node of a `drain --now` the image has a copy on, or "".
func (v *view) drainNow() string {
	for _, l := range v.img.Locations {
		if n := v.p.nodes[l]; n.Draining && n.DrainNow {
			return l
		}
	}
	return ""
}

// nodeCap is rule rate's cap of node n for a sync of an image with (or
// without) its own Sync policy.
func (p *planner) nodeCap(n string, imgSync bool) int64 {
	return NodeCap(p.s.PerNode, p.s.Default, n, imgSync)
}

// NodeCap is the cap in bytes/s (0: none) on node n's copy traffic for a
// sync of an image with (or without) its own sync policy: the node's
// policy when it has one (its 0 is uncapped), else the default's for an
// image without its own.
func NodeCap(perNode map[string]SyncPolicy, def SyncPolicy, n string, imgSync bool) int64 {
	if pol, ok := perNode[n]; ok {
		return pol.MaxRate
	}
	if !imgSync {
		return def.MaxRate
	}
	return 0
}

// finish is rule rate: it sets every Sync's Rate.
func (p *planner) finish() []Action {
	count := map[string]int64{}
	for _, si := range p.syncs {
		if si.drainNow {
			continue
		}
		for _, n := range si.involved {
			if p.nodeCap(n, si.imgSync) > 0 {
				count[n]++
			}
		}
	}
	for _, si := range p.syncs {
		if si.drainNow {
			p.out[si.idx].Reason += " (no rate cap)"
			continue
		}
		rate := si.imgCap
		why := ""
		if rate > 0 {
			why = "image cap"
		}
		for _, n := range si.involved {
			c := p.nodeCap(n, si.imgSync)
			if c <= 0 {
				continue
			}
			share := max(1, c/count[n])
			if rate == 0 || share < rate {
				rate = share
				why = fmt.Sprintf("node %s cap %s shared by %d %s", n, fmtRate(c), count[n], plural(int(count[n]), "sync", "syncs"))
			}
		}
		a := &p.out[si.idx]
		a.Rate = rate
		if rate > 0 {
			a.Reason += fmt.Sprintf(" at %s (%s)", fmtRate(rate), why)
		} else {
			a.Reason += " (no rate cap)"
		}
	}
	return p.out
}

// fmtRate formats bytes/s as ParseRate reads them where exact.
func fmtRate(r int64) string {
	switch {
	case r >= 1<<30 && r%(1<<30) == 0:
		return fmt.Sprintf("%dG/s", r>>30)
	case r >= 1<<20 && r%(1<<20) == 0:
		return fmt.Sprintf("%dM/s", r>>20)
	case r >= 1<<10 && r%(1<<10) == 0:
		return fmt.Sprintf("%dK/s", r>>10)
	}
	return fmt.Sprintf("%dB/s", r)
}
