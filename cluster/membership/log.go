package membership

import (
	"context"
	"log"
	"log/slog"
	"strings"
)

// slogWriter turns memberlist's "[LEVEL] memberlist: message" lines into
// slog records at debug level (memberlist is chatty about normal events).
type slogWriter struct{ l *slog.Logger }

func newMemberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(slogWriter{l: l}, "", 0)
}

func (w slogWriter) Write(p []byte) (int, error) {
	if !w.l.Enabled(context.Background(), slog.LevelDebug) {
		return len(p), nil
	}
	msg := strings.TrimSpace(string(p))
	level := ""
	if strings.HasPrefix(msg, "[") {
		if i := strings.IndexByte(msg, ']'); i > 0 {
			level, msg = msg[1:i], strings.TrimSpace(msg[i+1:])
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	w.l.Debug("memberlist: "+msg, "memberlist_level", level)
	return len(p), nil
}
