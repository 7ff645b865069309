package membership

import "fmt"

// EventType says what happened to a member.
type EventType int

const (
	// EventJoin: a node was seen alive for the first time, or came back
	// after being dead or left.
	EventJoin EventType = iota + 1
	// EventUpdate: a live node changed its meta (or its address).
	EventUpdate
	// EventLeave: a node left gracefully ([Agent.Leave]).
	EventLeave
	// EventFail: a node was declared dead by failure detection.
	EventFail
)

func (t EventType) String() string {
	switch t {
	case EventJoin:
		return "join"
	case EventUpdate:
		return "update"
	case EventLeave:
		return "leave"
	case EventFail:
		return "fail"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is a change of a member as seen by this agent. Member is a
// snapshot taken when the event happened.
type Event struct {
	Member Member
	Type   EventType
}

// push queues ev without ever blocking (it is called from memberlist's
// goroutines, under memberlist's lock). When the channel is full the
// oldest queued event is dropped: the member table ([Agent.Members]) stays
// the source of truth. The caller holds a.mu, which serialises senders.
func (a *Agent) push(ev Event) {
	if a.closed {
		return
	}
	for {
		select {
		case a.events <- ev:
			return
		default:
		}
		select {
		case old := <-a.events:
			a.dropped++
			a.log.Debug("membership: event queue full, dropped oldest event",
				"type", old.Type.String(), "member", old.Member.Name, "dropped_total", a.dropped)
		default:
		}
	}
}
