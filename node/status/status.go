// Package status sums up a cluster's health for `ukai status` and
// GET /v1/status: pure logic over what the answering node read (the
// membership, the catalog's records and block maps, the copy caps), no
// I/O.
package status

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
)

// Node is one member of the cluster.
type Node struct {
	Name     string
	State    string // alive, suspect, dead, left
	Cordoned bool
	Draining bool
	// Cap is the node's copy cap in bytes/s (0: none).
	Cap int64
}

// Image is one image (or snapshot) as the catalog has it.
type Image struct {
	Name      string
	Snapshot  bool
	Owner     string
	Attached  string
	BlockSize int64
	// Wanted is the number of copies it should have (its replica count,
	// else its locations).
	Wanted    int
	Locations []Location
	// Unprotected counts the blocks without an in-sync copy on a live
	// node.
	Unprotected int64
	SyncPaused  bool
}

// Location is one copy and its blocks not in sync.
type Location struct {
	Node      string
	OutOfSync int64
	Syncing   int64
}

// Summarize returns the cluster's status. unreadable lists records that
// could not be read (each one is a problem).
func Summarize(self string, now time.Time, nodes []Node, images []Image, unreadable []string) api.ClusterStatus {
	st := api.ClusterStatus{Node: self, Time: now, Activity: map[string]int{}, Problems: []api.Problem{}}
	byName := map[string]Node{}
	for _, n := range nodes {
		byName[n.Name] = n
		st.Nodes.Total++
		switch n.State {
		case "alive":
			st.Nodes.Alive++
		case "suspect":
			st.Nodes.Suspect++
		case "dead":
			st.Nodes.Dead++
		case "left":
			st.Nodes.Left++
		}
		if n.Draining {
			st.Nodes.Draining++
			st.Activity["drain"]++
		} else if n.Cordoned {
			st.Nodes.Cordoned++
		}
	}
	live := func(node string) bool {
		n, ok := byName[node]
		return ok && (n.State == "alive" || n.State == "suspect")
	}
	held := map[string][]string{} // dead node -> images with a copy there
	backlog := map[string]int64{} // live node -> bytes to copy to it
	paused := false               // some backlog waits for a resume
	for _, img := range images {
		if img.Snapshot {
			st.Images.Snapshots++
			continue
		}
		st.Images.Total++
		inSync := 0
		for _, l := range img.Locations {
			bytes := (l.OutOfSync + l.Syncing) * img.BlockSize
			st.OutOfSyncBytes += bytes
			if !live(l.Node) {
				held[l.Node] = append(held[l.Node], img.Name)
				continue
			}
			if bytes == 0 {
				inSync++
				continue
			}
			if img.SyncPaused {
				paused = true
				continue
			}
			backlog[l.Node] += bytes
		}
		if inSync < img.Wanted {
			st.Images.Degraded++
			st.Problems = append(st.Problems, api.Problem{Kind: "degraded", Image: img.Name,
				Detail: fmt.Sprintf("%d of %d wanted copies in sync on live nodes", inSync, img.Wanted)})
		}
		if img.Unprotected > 0 {
			st.Images.Unavailable++
			st.Problems = append(st.Problems, api.Problem{Kind: "unavailable", Image: img.Name,
				Detail: fmt.Sprintf("%d blocks have no in-sync copy on a live node", img.Unprotected)})
		}
		switch {
		case img.Attached != "" && !live(img.Attached):
			st.Images.Ownerless++
			st.Problems = append(st.Problems, api.Problem{Kind: "ownerless", Image: img.Name, Node: img.Attached,
				Detail: fmt.Sprintf("attached to %s, which is not alive: attach it to a live node", img.Attached)})
		case img.Owner != "" && !live(img.Owner):
			st.Images.Ownerless++
			st.Problems = append(st.Problems, api.Problem{Kind: "ownerless", Image: img.Name, Node: img.Owner,
				Detail: fmt.Sprintf("owned by %s, which is not alive; the next I/O moves it", img.Owner)})
		}
		for _, l := range img.Locations {
			if live(l.Node) && l.OutOfSync+l.Syncing > 0 {
				if img.SyncPaused {
					st.Activity["sync_paused"]++
				} else {
					st.Activity["sync"]++
				}
				break
			}
		}
		switch n := len(img.Locations); {
		case n < img.Wanted:
			st.Activity["add_copy"]++
		case n > img.Wanted:
			st.Activity["remove_copy"]++
		}
	}
	deadNodes := make([]string, 0, len(held))
	for n := range held {
		deadNodes = append(deadNodes, n)
	}
	sort.Strings(deadNodes)
	for _, n := range deadNodes {
		imgs := held[n]
		slices.Sort(imgs)
		state := "not a member"
		if m, ok := byName[n]; ok {
			state = m.State
		}
		st.Problems = append(st.Problems, api.Problem{Kind: "node_dead", Node: n,
			Detail: fmt.Sprintf("%s and holds copies of %d images (%s)", state, len(imgs), short(imgs))})
	}
	st.BacklogETASec = 0
	for n, bytes := range backlog {
		c := byName[n].Cap
		if c <= 0 {
			st.BacklogETASec = -1
			break
		}
		st.BacklogETASec = max(st.BacklogETASec, float64(bytes)/float64(c))
	}
	if (len(held) > 0 || paused) && st.BacklogETASec == 0 && st.OutOfSyncBytes > 0 {
		st.BacklogETASec = -1 // waits for a dead node's copies to be replaced, or for a resume
	}
	for _, u := range unreadable {
		st.Problems = append(st.Problems, api.Problem{Kind: "unreadable", Detail: u})
	}
	st.Healthy = len(st.Problems) == 0
	return st
}

// short lists at most five names.
func short(names []string) string {
	if len(names) <= 5 {
		return strings.Join(names, ", ")
	}
	return strings.Join(names[:5], ", ") + fmt.Sprintf(" and %d more", len(names)-5)
}
