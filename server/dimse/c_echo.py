"""C-ECHO SCP (PS3.4 Annex A, Verification Service Class)."""

from server.dimse.association import Association, Message
from server.dimse.commands import CommandField
from server.dimse.statuses import SUCCESS


def handle_c_echo(assoc: Association, message: Message) -> None:
    # PS3.7 9.3.5.2: C-ECHO-RSP.
    assoc.send_command(
        message.context,
        {
            "AffectedSOPClassUID": message.command.get("AffectedSOPClassUID", ""),
            "CommandField": CommandField.C_ECHO_RSP,
            "MessageIDBeingRespondedTo": message.message_id,
            "Status": SUCCESS,
        },
    )
