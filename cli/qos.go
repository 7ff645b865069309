package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ukai-storage/ukai/api"
)

// qosFlag is one of image set's QoS flags: an operation count or a size
// (bytes per second, parsed with ParseSize), and where it goes in the
// request.
type qosFlag struct {
	name, help string
	size       bool
	field      func(*api.QoSRequest) **int64
	value      string
}

// qosFlags are image set's QoS flags (docs/qos.md).
type qosFlags struct {
	flags []*qosFlag
	clear bool
}

func newQoSFlags() *qosFlags {
	q := &qosFlags{}
	add := func(name string, size bool, help string, field func(*api.QoSRequest) **int64) {
		q.flags = append(q.flags, &qosFlag{name: name, size: size, help: help, field: field})
	}
	add("iops-limit", false, "at most `N` operations per second, reads and writes together (0 removes the limit)", func(r *api.QoSRequest) **int64 { return &r.IOPSLimit })
	add("read-iops-limit", false, "at most `N` reads per second (0 removes)", func(r *api.QoSRequest) **int64 { return &r.ReadIOPSLimit })
	add("write-iops-limit", false, "at most `N` writes per second, UNMAP included (0 removes)", func(r *api.QoSRequest) **int64 { return &r.WriteIOPSLimit })
	add("bw-limit", true, "at most `SIZE` bytes per second, reads and writes together, e.g. 100M (0 removes)", func(r *api.QoSRequest) **int64 { return &r.BWLimit })
	add("read-bw-limit", true, "at most `SIZE` bytes read per second (0 removes)", func(r *api.QoSRequest) **int64 { return &r.ReadBWLimit })
	add("write-bw-limit", true, "at most `SIZE` bytes written per second (0 removes)", func(r *api.QoSRequest) **int64 { return &r.WriteBWLimit })
	add("iops-burst", false, "`N` operations an idle image may do at once before --iops-limit holds it (0: one second's worth, the default)", func(r *api.QoSRequest) **int64 { return &r.IOPSBurst })
	add("read-iops-burst", false, "burst (`N`) of --read-iops-limit (0: one second's worth)", func(r *api.QoSRequest) **int64 { return &r.ReadIOPSBurst })
	add("write-iops-burst", false, "burst (`N`) of --write-iops-limit (0: one second's worth)", func(r *api.QoSRequest) **int64 { return &r.WriteIOPSBurst })
	add("bw-burst", true, "`SIZE` an idle image may move at once before --bw-limit holds it (0: one second's worth, the default)", func(r *api.QoSRequest) **int64 { return &r.BWBurst })
	add("read-bw-burst", true, "burst (`SIZE`) of --read-bw-limit (0: one second's worth)", func(r *api.QoSRequest) **int64 { return &r.ReadBWBurst })
	add("write-bw-burst", true, "burst (`SIZE`) of --write-bw-limit (0: one second's worth)", func(r *api.QoSRequest) **int64 { return &r.WriteBWBurst })
	return q
}

func (q *qosFlags) register(fs *pflag.FlagSet) {
	for _, f := range q.flags {
		fs.StringVar(&f.value, f.name, "", f.help)
	}
	fs.BoolVar(&q.clear, "clear-qos", false, "remove every QoS limit (with other QoS flags: they start from none)")
}

// changed reports whether any QoS flag was given.
func (q *qosFlags) changed(fs *pflag.FlagSet) bool {
	if fs.Changed("clear-qos") {
		return true
	}
	for _, f := range q.flags {
		if fs.Changed(f.name) {
			return true
		}
	}
	return false
}

// request is the QoS request of the flags given.
func (q *qosFlags) request(fs *pflag.FlagSet) (api.QoSRequest, error) {
	req := api.QoSRequest{Clear: q.clear}
	for _, f := range q.flags {
		if !fs.Changed(f.name) {
			continue
		}
		var n int64
		var err error
		if f.size {
			n, err = ParseSize(f.value)
		} else {
			_, err = fmt.Sscan(f.value, &n)
			if err == nil && (n < 0 || fmt.Sprint(n) != strings.TrimSpace(f.value)) {
				err = fmt.Errorf("not a whole number")
			}
		}
		if err != nil {
			return req, fmt.Errorf("--%s %q: %v", f.name, f.value, err)
		}
		*f.field(&req) = &n
	}
	return req, nil
}

// qosString prints limits as an operator types them: "iops 2000, bw
// 100M/s (burst 200M)"; "none" without any.
func qosString(q api.QoS) string {
	var parts []string
	ops := func(name string, limit, burst int64) {
		if limit == 0 {
			return
		}
		s := fmt.Sprintf("%s %d/s", name, limit)
		if burst != 0 {
			s += fmt.Sprintf(" (burst %d)", burst)
		}
		parts = append(parts, s)
	}
	bytes := func(name string, limit, burst int64) {
		if limit == 0 {
			return
		}
		s := fmt.Sprintf("%s %s/s", name, FormatSize(limit))
		if burst != 0 {
			s += fmt.Sprintf(" (burst %s)", FormatSize(burst))
		}
		parts = append(parts, s)
	}
	ops("iops", q.IOPSLimit, q.IOPSBurst)
	ops("read iops", q.ReadIOPSLimit, q.ReadIOPSBurst)
	ops("write iops", q.WriteIOPSLimit, q.WriteIOPSBurst)
	bytes("bw", q.BWLimit, q.BWBurst)
	bytes("read bw", q.ReadBWLimit, q.ReadBWBurst)
	bytes("write bw", q.WriteBWLimit, q.WriteBWBurst)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// setQoS sends the QoS flags of image set.
func (a *app) setQoS(cmd *cobra.Command, image string, q *qosFlags) (api.QoS, error) {
	req, err := q.request(cmd.Flags())
	if err != nil {
		return api.QoS{}, err
	}
	got, err := a.client().SetImageQoS(cmd.Context(), image, req)
	if err != nil {
		return api.QoS{}, fmt.Errorf("set %s: %w", image, err)
	}
	return got, nil
}

// imageSetQoS is image set with QoS flags only: it prints the limits as
// stored.
func (a *app) imageSetQoS(cmd *cobra.Command, image string, q *qosFlags) error {
	got, err := a.setQoS(cmd, image, q)
	if err != nil {
		return err
	}
	if asked, err := printIfAsked(cmd, a.out, got); asked {
		return err
	}
	fmt.Fprintf(a.out, "qos of %s: %s\n", image, qosString(got))
	return nil
}
